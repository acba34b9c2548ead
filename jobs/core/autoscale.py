"""Autoscaling policy: the backlog, the operator's settings and the current count in, the desired worker
count and a reason out. Pure; the local control loop and GET /autoscale (read by KEDA on ACA) both call
`step`, so they always agree."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Inputs:
    """What the policy knows at one tick."""

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
class Backlog:
    """The runs' side of the inputs, read from the registry."""

    pending_rows: int
    queued_runs: int
    rows_per_s: float  # of all running runs together
    idle_s: float  # 0 while a run is active; inf before the first run


@dataclass
class ScalingSettings:
    """The operator's choices; a manual count switches autoscale off until it is switched back on."""

    autoscale: bool = True
    min_workers: int = 0
    max_workers: int = 2
    idle_timeout_s: float = 120.0
    desired: int = 0


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    source: str = "autoscaler"  # or "manual": the operator's count while autoscale is off


def _describe_backlog(pending_rows: int, queued_runs: int) -> str:
    # A queued run's rows are counted only once it plans: "a backlog of 0 rows" read as nothing to do.
    parts = [f"backlog of {pending_rows} rows"] if pending_rows else []
    if queued_runs:
        parts.append(f"{queued_runs} run{'' if queued_runs == 1 else 's'} not planned yet")
    return " and ".join(parts)


def decide(i: Inputs) -> Decision:
    """Scale out for a backlog, never in while work is pending, back to min after idling."""
    lo, hi = max(0, i.min_workers), max(i.min_workers, i.max_workers)
    if i.pending_rows > 0 or i.queued_runs > 0:
        backlog = _describe_backlog(i.pending_rows, i.queued_runs)
        if i.rows_per_s_per_worker <= 0:
            need = hi
            why = f"{backlog}, throughput unknown: scale to max"
        else:
            need = math.ceil(i.pending_rows / (i.rows_per_s_per_worker * i.drain_target_s))
            why = (f"{backlog} at {i.rows_per_s_per_worker:.0f} rows/s per worker "
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


def step(backlog: Backlog, settings: ScalingSettings, current: int) -> Decision:
    """The one autoscale step: the operator's manual count while autoscale is off, else the policy."""
    if not settings.autoscale:
        return Decision(settings.desired, "autoscale off: manual count", "manual")
    per_worker = backlog.rows_per_s / current if current and backlog.rows_per_s else 0.0
    return decide(Inputs(backlog.pending_rows, backlog.queued_runs, per_worker, current, settings.min_workers,
                         settings.max_workers, backlog.idle_s, settings.idle_timeout_s))
