"""Worker-count samples over time: which of them say nothing that their neighbours do not.

The autoscaler samples every tick (every 5 s under `make run`: about 17,000 rows a day in the registry, which on
Azure is the run's own SQL database). A run's cost reads the samples as a step function (each count holds until
the next sample) and the Cluster page's chart breaks its line wherever none came for SAMPLE_GAP_S (the controller
was not running). A sample that repeats the last one kept, and whose removal leaves no silence longer than
SAMPLE_GAP_S, changes neither, so old ones are thinned to about one a minute."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

# The controller samples at least every 5 s while it runs (KEDA's /autoscale polls every 30 s); a longer silence
# means it was not running.
SAMPLE_GAP_S = 60.0


def redundant(samples: Sequence[tuple[float, Hashable]], gap_s: float = SAMPLE_GAP_S) -> list[int]:
    """Indexes of the samples ((seconds, value), in time order) that can go: each repeats the value of the last
    sample kept, and without it the next sample would still come within gap_s of that one. The first and the last
    sample always stay."""
    gone: list[int] = []
    if len(samples) < 3:
        return gone
    kept_at, kept_value = samples[0]
    for i in range(1, len(samples) - 1):
        at, value = samples[i]
        if value == kept_value and samples[i + 1][0] - kept_at <= gap_s:
            gone.append(i)
        else:
            kept_at, kept_value = at, value
    return gone
