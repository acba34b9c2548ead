"""Scaling state: the operator's settings (a JSON file in EmbedDeck's home), the backlog read from the
registry, and the history of scale events and worker counts (tables beside the runs)."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import sqlalchemy as sa

from jobs.core.autoscale import Backlog, Decision, ScalingSettings, step
from jobs.core.processes import read_json, write_json
from jobs.core.settings import Settings
from jobs.store.db import utcnow
from jobs.store.registry import QUEUED, RUNNING, Registry

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


def settings_path(home: Path | None = None) -> Path:
    return (home or Settings().home) / "cluster" / "settings.json"


def load_settings(home: Path | None = None) -> ScalingSettings:
    """The operator's scaling settings; defaults when none were saved (unknown keys are ignored)."""
    data = read_json(settings_path(home))
    known = {f.name for f in fields(ScalingSettings)}
    return ScalingSettings(**{k: v for k, v in data.items() if k in known}) if isinstance(data, dict) \
        else ScalingSettings()


def save_settings(settings: ScalingSettings, home: Path | None = None) -> None:
    write_json(settings_path(home), asdict(settings))


def set_manual(n: int, home: Path | None = None) -> ScalingSettings:
    """The operator's manual count: autoscale goes off until it is switched back on."""
    settings = load_settings(home)
    settings.autoscale, settings.desired = False, n
    save_settings(settings, home)
    return settings


def backlog(registry: Registry) -> Backlog:
    """Pending rows, queued runs, throughput and idle time, from the registry alone.

    Idle time is measured from the end of the last run, so the answer needs no loop state and any
    process (the local controller, the API's /autoscale for KEDA) computes the same number.
    """
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
    return Backlog(pending, queued, rate, idle_s)


def desired(registry: Registry, current: int, home: Path | None = None) -> Decision:
    """The autoscale step on the registry's backlog and the operator's settings."""
    return step(backlog(registry), load_settings(home), current)


class ScaleHistory:
    """Scale events and worker-count samples, kept in the registry's database."""

    def __init__(self, registry: Registry):
        self.engine = registry.engine
        metadata.create_all(self.engine, checkfirst=True)

    def record(self, frm: int, to: int, reason: str, source: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(events_table.insert().values(at=utcnow(), from_workers=frm, to_workers=to,
                                                      reason=reason, source=source))

    def sample(self, workers: int, wanted: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(samples_table.insert().values(at=utcnow(), workers=workers, desired=wanted))

    def events(self, limit: int = 500) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(events_table.select().order_by(events_table.c.at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows][::-1]

    def samples(self, limit: int = 2000) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(samples_table.select().order_by(samples_table.c.at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows][::-1]
