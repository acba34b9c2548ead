"""Autoscaling policy: backlog and throughput in, desired worker count and a reason out. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Inputs:
    """What the controller knows at one tick."""

    pending_rows: int  # rows still to embed in queued and running runs
    queued_runs: int  # runs whose backlog is not planned yet
    rows_per_s_per_worker: float  # measured; 0 when unknown
    current: int
    min_workers: int = 0
    max_workers: int = 4
    idle_s: float = 0.0  # seconds since the last run ended with nothing pending
    idle_timeout_s: float = 300.0
    drain_target_s: float = 600.0  # aim to clear the backlog within this time


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str


def decide(i: Inputs) -> Decision:
    """Scale out for a backlog, never in while work is pending, back to min after idling."""
    lo, hi = max(0, i.min_workers), max(i.min_workers, i.max_workers)
    backlog = i.pending_rows > 0 or i.queued_runs > 0
    if backlog:
        if i.rows_per_s_per_worker <= 0:
            need = hi
            why = f"backlog of {i.pending_rows} rows, throughput unknown: scale to max"
        else:
            need = math.ceil(i.pending_rows / (i.rows_per_s_per_worker * i.drain_target_s))
            why = (f"backlog of {i.pending_rows} rows at {i.rows_per_s_per_worker:.0f} rows/s per worker "
                   f"needs {need} to drain in {i.drain_target_s / 60:.0f} min")
        # Flapping guard: while work is pending, only grow; shrinking kills busy executors.
        desired = min(hi, max(lo, 1, need, i.current))
        return Decision(desired, why if desired != i.current else f"hold: {why}")
    if i.current > lo and i.idle_s >= i.idle_timeout_s:
        idle = "no run yet" if i.idle_s == float("inf") else f"idle for {i.idle_s:.0f}s"
        return Decision(lo, f"{idle}: scale in to min {lo}")
    if i.current < lo:
        return Decision(lo, f"below min {lo}")
    if i.current > hi:
        return Decision(hi, f"above max {hi}")
    return Decision(i.current, "hold: no backlog" if i.current <= lo else
                    f"hold: idle {i.idle_s:.0f}s of {i.idle_timeout_s:.0f}s")
