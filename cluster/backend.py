"""The one interface the dashboard and autoscaler use over local processes or Azure Container Apps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Worker:
    """One worker process or replica as the backend sees it."""

    name: str
    state: str  # ALIVE, STARTING, DEAD, Running, NotRunning…
    cores: int | None = None
    memory_mb: int | None = None
    started_at: float | None = None
    detail: str = ""


class Backend(Protocol):
    """Start, scale and inspect the workers of one cluster."""

    def workers(self) -> list[Worker]:
        """The workers that exist now, alive or not."""
        ...

    def scale(self, n: int) -> list[Worker]:
        """Make n workers exist; returns them."""
        ...

    def master_url(self) -> str:
        """The spark:// URL that runs submit to."""
        ...
