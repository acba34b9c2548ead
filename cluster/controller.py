"""The local control loop: takes the one autoscale step (jobs/store/scaling.py) through a Backend and records
every decision. On ACA no loop runs: KEDA reads the same step's answer from the API's /autoscale."""

from __future__ import annotations

import logging
import time

from cluster.backend import Backend
from jobs import lifecycle
from jobs.core.autoscale import Decision
from jobs.store import scaling
from jobs.store.registry import Registry

log = logging.getLogger("embeddeck.controller")


class Controller:
    """Reads the backlog and the operator's settings, decides, scales the backend, and records it."""

    def __init__(self, backend: Backend, registry: Registry | None = None):
        self.backend = backend
        self.registry = registry or Registry()
        self.history = scaling.ScaleHistory(self.registry)

    def current(self) -> int:
        """Workers running now, as the backend sees them."""
        return sum(1 for w in self.backend.workers() if w.running)

    def scale_manually(self, n: int) -> None:
        """Operator override: scale now and keep autoscale off until it is switched back on."""
        current = self.current()
        scaling.set_manual(n, self.registry)
        self.backend.scale(n)
        self.history.record(current, n, "manual scale by operator", "manual")

    def tick(self) -> Decision:
        """One control step; returns what it decided."""
        lifecycle.refresh(self.registry)  # dead drivers, overdue cancels, waiting runs whose slot came free
        current = self.current()
        decision = scaling.desired(self.registry, current)
        if decision.desired != current:
            self.backend.scale(decision.desired)
            self.history.record(current, decision.desired, decision.reason, decision.source)
            log.info("scaled %d -> %d: %s", current, decision.desired, decision.reason)
        self.history.sample(self.current(), decision.desired)
        return decision

    def newest_run(self) -> str | None:
        """The latest run's id: a new one means a launch the loop should act on now."""
        runs = self.registry.list(limit=1)
        return runs[0].run_id if runs else None

    def loop(self, every_s: float = 5.0, wake_check_s: float = 0.25) -> None:
        """Run until killed; a failing tick is logged and retried, never fatal. Between ticks it looks for a
        newly launched run every wake_check_s (one indexed query), so a launch is acted on at once, not at
        the next poll."""
        while True:
            try:
                self.tick()
                seen = self.newest_run()
            except Exception as exc:
                log.warning("controller tick failed: %s", exc)
                time.sleep(every_s)
                continue
            deadline = time.monotonic() + every_s
            while time.monotonic() < deadline:
                time.sleep(wake_check_s)
                try:
                    if self.newest_run() != seen:
                        break
                except Exception:
                    break  # the next tick logs what is wrong
