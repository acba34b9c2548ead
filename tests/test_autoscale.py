"""The autoscaling policy, table-driven."""

import pytest

from jobs.core.autoscale import Inputs, decide


@pytest.mark.parametrize("inputs,desired,reason", [
    # backlog with unknown throughput: go to max
    (Inputs(5000, 0, 0.0, current=0, max_workers=4), 4, "throughput unknown"),
    # queued run without a plan yet counts as backlog
    (Inputs(0, 1, 0.0, current=0, max_workers=3), 3, "1 run not planned yet, throughput unknown: scale to max"),
    (Inputs(500, 2, 0.0, current=0, max_workers=3), 3, "backlog of 500 rows and 2 runs not planned yet,"),
    # measured throughput sizes the cluster: 60000 rows / (50 rows/s * 600 s) = 2
    (Inputs(60000, 0, 50.0, current=0, max_workers=8), 2, "needs 2"),
    # bounded by max
    (Inputs(10_000_000, 0, 50.0, current=2, max_workers=5), 5, "backlog"),
    # flapping guard: small remaining backlog does not shrink a busy cluster
    (Inputs(100, 0, 50.0, current=4, max_workers=8), 4, "hold"),
    # no backlog, not idle long enough: hold
    (Inputs(0, 0, 50.0, current=3, idle_s=100, idle_timeout_s=300), 3, "hold: idle 100s"),
    # idle long enough: back to min
    (Inputs(0, 0, 50.0, current=3, idle_s=301, idle_timeout_s=300), 0, "scale in to min 0"),
    (Inputs(0, 0, 50.0, current=3, min_workers=1, idle_s=999), 1, "min 1"),
    # bounds when idle
    (Inputs(0, 0, 0.0, current=0, min_workers=2), 2, "below min"),
    (Inputs(0, 0, 0.0, current=6, max_workers=4, idle_s=0), 4, "above max"),
    # nothing to do at zero
    (Inputs(0, 0, 0.0, current=0), 0, "no backlog"),
])
def test_policy(inputs, desired, reason):
    d = decide(inputs)
    assert d.desired == desired
    assert reason in d.reason
