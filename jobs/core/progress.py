"""Throughput and ETA from progress samples: pure functions shared by every front door."""

from __future__ import annotations


def rate(samples: list[tuple[float, int]], window_s: float = 15.0) -> float:
    """Rows per second over the last window_s seconds of (time, rows_done) samples."""
    if len(samples) < 2:
        return 0.0
    t_end, n_end = samples[-1]
    start = samples[0]
    for t, n in reversed(samples):
        start = (t, n)
        if t_end - t >= window_s:
            break
    dt = t_end - start[0]
    return max(0.0, (n_end - start[1]) / dt) if dt > 0 else 0.0


def eta_seconds(total: int | None, done: int, rows_per_s: float) -> float | None:
    """Seconds left at the current rate, or None when it cannot be known."""
    if total is None or rows_per_s <= 0:
        return None
    return max(0.0, (total - done) / rows_per_s)


def format_duration(seconds: float | None) -> str:
    """Short human duration: 42s, 3m05s, 1h02m."""
    if seconds is None:
        return "—"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# The marks a run records, in the order they happen; each stage of the start-up breakdown is the
# time from the previous mark to its own.
START_STAGES = (
    ("jvm", "driver_started"),          # spark-submit's JVM up, Python driver spawned
    ("spark_app", "app_ready"),         # SparkContext registered with the master
    ("python_worker", "worker_started"),  # executor, Python daemon, its imports, first worker forked
    ("model_load", "model_ready"),      # weights loaded in that worker
    ("planning", "planned"),            # the scan job over every key range
    ("first_batch", "first_commit"),    # first chunk read, encoded and committed
)


def start_breakdown(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per start-up stage from marks in seconds since launch; a stage already done (warm) is 0."""
    out, previous = {}, 0.0
    for stage, mark in START_STAGES:
        at = max(previous, marks.get(mark, previous))
        out[stage] = at - previous
        previous = at
    return out
