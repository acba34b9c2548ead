"""What a run cost: the workers it held, as worker-seconds and billing units, and an estimate at a price.

Worker counts come as samples (a count holds until the next sample). While several runs are active at
once, each second of the workers is shared evenly among them, so the runs' costs add up to the bill.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

Interval = tuple[float, float]


def worker_seconds(samples: Sequence[tuple[float, int]], run: Interval, others: Sequence[Interval] = ()) -> float:
    """Worker-seconds of this run: the sampled worker count over its interval, shared with overlapping runs."""
    start, end = run
    if end <= start or not samples:
        return 0.0
    points = sorted(samples)
    cuts = {start, end} | {t for t, _ in points if start < t < end}
    cuts |= {t for a, b in others for t in (a, b) if start < t < end}
    edges = sorted(cuts)
    total = 0.0
    for a, b in itertools.pairwise(edges):
        workers = _count_at(points, a)
        sharing = 1 + sum(1 for x, y in others if x <= a < y)
        total += workers * (b - a) / sharing
    return total


def _count_at(points: Sequence[tuple[float, int]], t: float) -> int:
    """The last sampled count at or before t; before the first sample, nothing is known to run."""
    count = 0
    for at, n in points:
        if at > t:
            break
        count = n
    return count


@dataclass(frozen=True)
class Pricing:
    """How a backend bills a worker: `units` of `unit` per worker, at `price_per_unit_s` in `currency`."""

    unit: str  # "core" locally, "GPU" on ACA's serverless GPU profiles
    units_per_worker: float
    price_per_unit_s: float | None = None
    currency: str = "USD"
    source: str = ""


@dataclass(frozen=True)
class RunCost:
    worker_s: float
    unit_s: float
    amount: float | None
    pricing: Pricing

    def label(self) -> str:
        """One line for the dashboard and CLI: units used, and the estimate with its rate and source."""
        used = f"{self.unit_s:,.1f} {self.pricing.unit}-seconds ({self.worker_s:,.1f} worker-seconds)"
        if self.amount is None:
            return used + " · no price configured"
        rate = f"{self.pricing.price_per_unit_s:.6g} {self.pricing.currency}/{self.pricing.unit}-second"
        source = f", {self.pricing.source}" if self.pricing.source else ""
        return f"{used} ≈ {self.amount:.4f} {self.pricing.currency} at {rate}{source}"


def run_cost(worker_s: float, pricing: Pricing) -> RunCost:
    """Units and amount for this many worker-seconds."""
    unit_s = worker_s * pricing.units_per_worker
    amount = None if pricing.price_per_unit_s is None else unit_s * pricing.price_per_unit_s
    return RunCost(worker_s, unit_s, amount, pricing)
