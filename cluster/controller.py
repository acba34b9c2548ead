"""The controller loop: applies the autoscaling policy through a backend and records every decision."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sqlalchemy as sa

from cluster.autoscale import Decision, Inputs, decide
from cluster.local import LocalCluster
from jobs.db import default_home, utcnow
from jobs.runs import QUEUED, RUNNING, Registry

log = logging.getLogger("embeddeck.controller")

metadata = sa.MetaData()
events_table = sa.Table(
    "scale_events", metadata,
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("from_workers", sa.Integer, nullable=False),
    sa.Column("to_workers", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # autoscaler or manual
)
samples_table = sa.Table(
    "worker_samples", metadata,
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("workers", sa.Integer, nullable=False),
    sa.Column("desired", sa.Integer, nullable=False),
)


@dataclass
class Settings:
    """Operator's choices; manual scaling switches autoscale off until it is switched back on."""

    autoscale: bool = True
    min_workers: int = 0
    max_workers: int = 2
    idle_timeout_s: float = 120.0
    desired: int = 0


def settings_path(home: Path | None = None) -> Path:
    return (home or default_home()) / "cluster" / "settings.json"


def load_settings(home: Path | None = None) -> Settings:
    try:
        return Settings(**json.loads(settings_path(home).read_text()))
    except (OSError, ValueError, TypeError):
        return Settings()


def save_settings(settings: Settings, home: Path | None = None) -> None:
    path = settings_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(settings)))


def backlog_inputs(registry: Registry, settings: Settings, current: int) -> Inputs:
    """Policy inputs from the registry: pending rows, queued runs, rate per worker, idle time.

    Idle time is measured from the end of the last run, so the answer needs no loop state and any
    process (the local controller, the API's /autoscale for KEDA) computes the same number.
    """
    registry.reconcile()
    runs = registry.list(limit=200)
    active = [r for r in runs if r.state in (QUEUED, RUNNING)]
    pending = sum(max(0, (r.rows_total or 0) - r.rows_done) for r in active if r.state == RUNNING)
    queued = sum(1 for r in active if r.state == QUEUED or r.rows_total is None)
    rate = sum(r.rows_per_s for r in active if r.state == RUNNING)
    ended = [r.ended_at for r in runs if r.ended_at is not None]
    if active:
        idle_s = 0.0
    elif ended:
        idle_s = (utcnow() - max(ended)).total_seconds()
    else:
        idle_s = float("inf")
    return Inputs(pending, queued, rate / current if current and rate else 0.0, current,
                  settings.min_workers, settings.max_workers, idle_s, settings.idle_timeout_s)


class Controller:
    """Reads the backlog from the registry, decides, scales the cluster, and records it."""

    def __init__(self, cluster: LocalCluster | None = None, registry: Registry | None = None):
        self.cluster = cluster or LocalCluster()
        self.registry = registry or Registry()
        metadata.create_all(self.registry.engine, checkfirst=True)

    def record(self, frm: int, to: int, reason: str, source: str) -> None:
        with self.registry.engine.begin() as conn:
            conn.execute(events_table.insert().values(at=utcnow(), from_workers=frm, to_workers=to,
                                                      reason=reason, source=source))

    def sample(self, workers: int, desired: int) -> None:
        with self.registry.engine.begin() as conn:
            conn.execute(samples_table.insert().values(at=utcnow(), workers=workers, desired=desired))

    def scale_manually(self, n: int) -> None:
        """Operator override: scale now and keep autoscale off until it is switched back on."""
        current = len(self.cluster.worker_pids())
        settings = load_settings(self.cluster.dir.parent)
        settings.autoscale, settings.desired = False, n
        save_settings(settings, self.cluster.dir.parent)
        self.cluster.scale(n)
        self.record(current, n, "manual scale by operator", "manual")

    def tick(self) -> Decision:
        """One control step; returns what it decided."""
        settings = load_settings(self.cluster.dir.parent)
        current = len(self.cluster.worker_pids())
        if not settings.autoscale:
            decision = Decision(settings.desired, "autoscale off: manual count")
        else:
            decision = decide(backlog_inputs(self.registry, settings, current))
        if decision.desired != current:
            self.cluster.scale(decision.desired)
            self.record(current, decision.desired, decision.reason,
                        "autoscaler" if settings.autoscale else "manual")
            log.info("scaled %d -> %d: %s", current, decision.desired, decision.reason)
        self.sample(len(self.cluster.worker_pids()), decision.desired)
        return decision

    def events(self, limit: int = 500) -> list[dict]:
        with self.registry.engine.connect() as conn:
            rows = conn.execute(events_table.select().order_by(events_table.c.at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows][::-1]

    def samples(self, limit: int = 2000) -> list[dict]:
        with self.registry.engine.connect() as conn:
            rows = conn.execute(samples_table.select().order_by(samples_table.c.at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows][::-1]

    def loop(self, every_s: float = 5.0) -> None:
        """Run until killed; a failing tick is logged and retried, never fatal."""
        while True:
            try:
                self.tick()
            except Exception as exc:
                log.warning("controller tick failed: %s", exc)
            time.sleep(every_s)
