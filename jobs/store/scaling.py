"""Scaling state, all in the registry's database so that every process of a deployment shares it (on ACA the
dashboard app sets the operator's count, the controller app's /autoscale reads it): the operator's settings,
the backlog read from the runs, the history of scale events and worker counts, and what each run cost."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, fields, replace

import sqlalchemy as sa

from jobs.core.autoscale import Backlog, Decision, ScalingSettings, step
from jobs.core.cost import Pricing, RunCost, run_cost, worker_seconds
from jobs.core.errors import BadRequest
from jobs.core.samples import redundant
from jobs.core.settings import Settings
from jobs.core.spec import in_process
from jobs.store.db import OWN_PREFIX, utcnow
from jobs.store.registry import QUEUED, RUNNING, Registry, Run

log = logging.getLogger("embeddeck.scaling")
# The last day keeps every sample; older ones are thinned (jobs/core/samples.py), by each sampling process hourly.
KEEP_EVERY_SAMPLE_S = 86_400.0
THIN_EVERY_S = 3_600.0
metadata = sa.MetaData()
events_table = sa.Table(
    f"{OWN_PREFIX}scale_events", metadata,
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("from_workers", sa.Integer, nullable=False),
    sa.Column("to_workers", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("source", sa.String(20), nullable=False),  # autoscaler or manual
)
samples_table = sa.Table(
    f"{OWN_PREFIX}worker_samples", metadata,
    sa.Column("at", sa.DateTime, nullable=False, index=True),
    sa.Column("workers", sa.Integer, nullable=False),
    sa.Column("desired", sa.Integer, nullable=False),
)
settings_table = sa.Table(
    f"{OWN_PREFIX}scaling_settings", metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1: one operator setting per deployment
    sa.Column("settings_json", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


def load_settings(registry: Registry) -> ScalingSettings:
    """The operator's scaling settings, their counts within today's EMBEDDECK_MAX_WORKERS (and the minimum within the
    maximum, as an older version could save them); defaults when none were saved (unknown keys are ignored)."""
    registry.ensure(metadata)
    with registry.engine.connect() as conn:
        text = conn.execute(sa.select(settings_table.c.settings_json).where(settings_table.c.id == 1)).scalar()
    data = json.loads(text) if text else {}
    known = {f.name for f in fields(ScalingSettings)}
    saved = ScalingSettings(**{k: v for k, v in data.items() if k in known})
    # Saved under a higher limit, a maximum of 4 outlived a limit lowered to 2: the autoscaler asked for 4, and a
    # manual `scale 1` was refused for a "max workers 4" the operator had not just asked for.
    limit = max_workers()
    most = min(saved.max_workers, limit)
    return replace(saved, min_workers=min(saved.min_workers, most), max_workers=most, desired=min(saved.desired, limit))


def max_workers() -> int:
    """The most workers any door may ask for (EMBEDDECK_MAX_WORKERS): the worker app's replica limit on ACA, and
    locally what keeps a typo's `scale 40` from starting forty worker JVMs on one machine."""
    return Settings().integer("EMBEDDECK_MAX_WORKERS")


def check_workers(n: int, what: str = "workers") -> None:
    """BadRequest naming the limit when n is over it (or below zero)."""
    limit = max_workers()
    if not 0 <= n <= limit:
        raise BadRequest(f"{what} must be between 0 and {limit} (EMBEDDECK_MAX_WORKERS), not {n}")


def save_settings(settings: ScalingSettings, registry: Registry) -> None:
    """Store the operator's settings, their counts within EMBEDDECK_MAX_WORKERS and the minimum within the maximum."""
    check_workers(settings.min_workers, "min workers")
    check_workers(settings.max_workers, "max workers")
    if settings.min_workers > settings.max_workers:  # the autoscaler then kept the minimum, above the maximum
        raise BadRequest(f"min workers ({settings.min_workers}) must not be more than max workers "
                         f"({settings.max_workers})")
    registry.ensure(metadata)
    values = {"settings_json": json.dumps(asdict(settings)), "updated_at": utcnow()}
    with registry.engine.begin() as conn:
        if not conn.execute(settings_table.update().where(settings_table.c.id == 1).values(**values)).rowcount:
            conn.execute(settings_table.insert().values(id=1, **values))


def set_manual(n: int, registry: Registry) -> ScalingSettings:
    """The operator's manual count: autoscale goes off until it is switched back on."""
    check_workers(n)
    settings = load_settings(registry)
    settings.autoscale, settings.desired = False, n
    save_settings(settings, registry)
    return settings


def backlog(registry: Registry) -> Backlog:
    """Pending rows, queued runs, throughput and idle time, from the registry alone.

    Idle time is measured from the end of the last run, so the answer needs no loop state and any
    process (the local controller, the API's /autoscale for KEDA) computes the same number.
    """
    # A local[N] run (no run service was up when it was launched) uses no worker: workers started for it idled.
    runs = [r for r in registry.list(limit=200) if not in_process(r.master)]
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


def desired(registry: Registry, current: int) -> Decision:
    """The autoscale step on the registry's backlog and the operator's settings."""
    return step(backlog(registry), load_settings(registry), current)


class ScaleHistory:
    """Scale events and worker-count samples, kept in the registry's database."""

    def __init__(self, registry: Registry):
        self.registry = registry
        registry.ensure(metadata)
        self._next_thin = 0.0  # monotonic seconds: this process's first sample thins at once
        self._thinned_until: dt.datetime | None = None

    @property
    def engine(self) -> sa.Engine:
        self.registry.ensure(metadata)  # a deleted SQLite registry is started again, these tables with it
        return self.registry.engine

    def record(self, frm: int, to: int, reason: str, source: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(events_table.insert().values(at=utcnow(), from_workers=frm, to_workers=to,
                                                      reason=reason, source=source))

    def sample(self, workers: int, wanted: int) -> None:
        """Record a tick's worker count and desired count; at most hourly, thin the samples older than a day."""
        with self.engine.begin() as conn:
            conn.execute(samples_table.insert().values(at=utcnow(), workers=workers, desired=wanted))
        if time.monotonic() >= self._next_thin:
            self._next_thin = time.monotonic() + THIN_EVERY_S
            try:
                self.thin(utcnow() - dt.timedelta(seconds=KEEP_EVERY_SAMPLE_S))
            except sa.exc.SQLAlchemyError as exc:  # housekeeping: the next hour tries again
                log.warning("thinning old worker samples failed: %s", exc)

    def thin(self, before: dt.datetime) -> int:
        """Delete the samples before `before` that neither a run's cost nor the chart's gaps need (see
        jobs/core/samples.py); how many went. After its first call a process reads only the last hours."""
        c = samples_table.c
        query = sa.select(c.at, c.workers, c.desired).where(c.at < before).order_by(c.at)
        if self._thinned_until is not None:
            query = query.where(c.at >= self._thinned_until - dt.timedelta(seconds=THIN_EVERY_S))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        ats = Counter(at for at, _, _ in rows)
        gone = [rows[i].at for i in redundant([(_seconds(at), (w, d)) for at, w, d in rows])
                if ats[rows[i].at] == 1]  # a time two samples share is not a key to delete by
        for start in range(0, len(gone), 500):
            with self.engine.begin() as conn:
                conn.execute(samples_table.delete().where(c.at.in_(gone[start:start + 500])))
        self._thinned_until = before
        return len(gone)

    def events(self, limit: int = 500) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(events_table.select().order_by(events_table.c.at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows][::-1]

    def samples(self, limit: int = 2000) -> list[dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(samples_table.select().order_by(samples_table.c.at.desc()).limit(limit)).mappings()
            return [dict(r) for r in rows][::-1]

    def last_desired(self) -> int | None:
        """The desired count of the latest sample: a decision is an event only when it changes."""
        with self.engine.connect() as conn:
            return conn.execute(sa.select(samples_table.c.desired).order_by(samples_table.c.at.desc())
                                .limit(1)).scalar()

    def counts(self, start: dt.datetime, end: dt.datetime) -> list[tuple[float, int]]:
        """Worker counts sampled between start and end, led by the last one before start (the count then)."""
        c = samples_table.c
        with self.engine.connect() as conn:
            before = conn.execute(sa.select(c.at, c.workers).where(c.at <= start).order_by(c.at.desc())
                                  .limit(1)).all()
            during = conn.execute(sa.select(c.at, c.workers).where(c.at > start, c.at <= end)
                                  .order_by(c.at)).all()
        return [(_seconds(at), n) for at, n in [*before, *during]]


def _seconds(at: dt.datetime) -> float:
    return at.replace(tzinfo=dt.UTC).timestamp()


def cost(registry: Registry, run: Run, pricing: Pricing) -> RunCost:
    """What this run cost on the workers it ran on, sharing each second with the runs active beside it."""
    if run.started_at is None:
        return run_cost(0.0, pricing)
    now = utcnow()
    end = run.ended_at or now
    others = [(_seconds(r.started_at), _seconds(r.ended_at or now)) for r in registry.list(200)
              if r.run_id != run.run_id and not in_process(r.master) and r.started_at and r.started_at < end
              and (r.ended_at or now) > run.started_at]
    samples = ScaleHistory(registry).counts(run.started_at, end)
    return run_cost(worker_seconds(samples, (_seconds(run.started_at), _seconds(end)), others), pricing)
