"""The one interface every door uses over the workers of a cluster: local processes or ACA replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cluster.spark_rest import MasterState
from jobs.core.cost import Pricing
from jobs.core.settings import Settings
from jobs.store.worker_readings import Reading

RUNNING_STATES = ("ALIVE", "STARTING", "Running")


@dataclass
class Worker:
    """One worker process or replica as the backend sees it."""

    name: str
    state: str  # ALIVE, STARTING, DEAD (local); Running, NotRunning, Unknown (ACA)
    cores: int | None = None
    memory_mb: int | None = None
    started_at: float | None = None
    detail: str = ""

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


def configured_pricing(unit: str, units_per_worker: float) -> Pricing:
    """A backend's billing unit with the price the configuration gives (none: costs show units only)."""
    settings = Settings()
    price = settings.number("EMBEDDECK_PRICE_PER_UNIT_S") if settings.raw("EMBEDDECK_PRICE_PER_UNIT_S") else None
    return Pricing(unit, units_per_worker, price, settings.raw("EMBEDDECK_PRICE_CURRENCY") or "USD",
                   settings.raw("EMBEDDECK_PRICE_SOURCE") or "")


class Backend(Protocol):
    """List, scale and measure the workers of one cluster, and reach its Spark master."""

    name: str  # "local" or "aca"
    master_webui: str

    def workers(self) -> list[Worker]:
        """The workers that exist now, alive or not."""
        ...

    def scale(self, n: int) -> list[Worker]:
        """Ask for n workers; returns the workers that exist afterwards."""
        ...

    def utilisation(self) -> list[Reading]:
        """Each worker's latest CPU, memory and GPU reading (stale ones marked)."""
        ...

    def master_url(self) -> str:
        """The spark:// URL that runs submit to."""
        ...

    def master_state(self) -> MasterState:
        """The Spark master's own view of its workers and applications."""
        ...

    def up(self, workers: int | None = None) -> MasterState:
        """Start the master where the backend can, then scale to `workers` (None: a running master keeps its
        workers); BadRequest where it cannot."""
        ...

    def down(self) -> None:
        """Stop the workers and the master where the backend can; BadRequest where it cannot."""
        ...

    def pricing(self) -> Pricing:
        """What one worker bills per second: cores locally, GPUs on ACA, at the configured price."""
        ...
