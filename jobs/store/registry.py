"""The run registry: every run's state, progress and history, durable and shared by all front doors."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import uuid
from dataclasses import dataclass, fields

import sqlalchemy as sa

from jobs.core.errors import Conflict, EmbedDeckError, Unavailable
from jobs.core.processes import is_alive, process_identity
from jobs.core.settings import Settings
from jobs.store.db import (
    OWN_PREFIX,
    absolute_url,
    adopt_older_names,
    check_connection,
    connection_error_message,
    create_missing,
    sqlite_file,
    utcnow,
)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
WAITING = "waiting"  # the phase of a queued run held back by the cap on active runs, or until the run service is up
# A driver on another host that has not written a heartbeat for this long is taken for dead; so is the host of a
# waiting run that no reader there has vouched for in this long (its URL is kept only there). At least: see
# heartbeat_timeout_s.
HEARTBEAT_TIMEOUT_S = 60
# How often a host's readers renew their waiting runs' heartbeat: a write at most this often, well inside the timeout.
VOUCH_EVERY_S = 10

metadata = sa.MetaData()
runs_table = sa.Table(
    f"{OWN_PREFIX}runs", metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("cancel_requested_at", sa.DateTime),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("launched_by", sa.String(40), nullable=False),
    sa.Column("source", sa.String(400)),
    sa.Column("target", sa.String(400)),
    sa.Column("model", sa.String(400)),
    sa.Column("master", sa.String(200)),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("started_at", sa.DateTime),
    sa.Column("ended_at", sa.DateTime),
    sa.Column("heartbeat_at", sa.DateTime),
    sa.Column("rows_total", sa.Integer),
    sa.Column("rows_done", sa.Integer, nullable=False, default=0),
    sa.Column("rows_skipped", sa.Integer, nullable=False, default=0),
    sa.Column("rows_removed", sa.Integer),  # vectors of rows gone from the source or emptied, deleted by the run
    sa.Column("rows_per_s", sa.Float, nullable=False, default=0.0),
    sa.Column("phase", sa.String(40)),
    sa.Column("error", sa.Text),
    sa.Column("driver_pid", sa.Integer),
    sa.Column("driver_host", sa.String(200)),
    sa.Column("driver_started", sa.Float),  # an older EmbedDeck's: psutil's create_time, which the wall clock moves
    sa.Column("log_path", sa.Text),
    sa.Column("ui_url", sa.String(200)),
    sa.Column("timings", sa.Text),  # JSON: start-up marks, seconds since launch
    sa.Column("target_key", sa.String(900)),  # the database (redacted) and target a run writes
    # The executors its Spark application holds, once it has held none for NO_EXECUTOR_GRACE_S (None on a local[N]
    # master, whose driver runs the tasks): a run at 0 waits for a worker's cores.
    sa.Column("executors", sa.Integer),
    sa.Column("driver_identity", sa.String(80)),  # processes.process_identity of driver_pid on driver_host
)
# One active run per target: a second one is refused by the database itself, so two doors racing to
# launch into one target cannot both win.
_ACTIVE = runs_table.c.state.in_((QUEUED, RUNNING))
one_active_run_per_target = sa.Index("one_active_run_per_target", runs_table.c.target_key, unique=True,
                                     sqlite_where=_ACTIVE, postgresql_where=_ACTIVE, mssql_where=_ACTIVE)
# One row whose update serializes the decision to start a run, across processes and hosts: it takes the
# database's write lock (SQLite) or the row's lock (PostgreSQL, SQL Server) until the transaction ends.
slots_table = sa.Table(
    f"{OWN_PREFIX}run_slots", metadata,
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("decisions", sa.Integer, nullable=False),
)
SLOTS_ROW = "start"
progress_table = sa.Table(
    f"{OWN_PREFIX}run_progress", metadata,
    sa.Column("run_id", sa.String(40), nullable=False, index=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("rows_done", sa.Integer, nullable=False),
    sa.Column("rows_per_s", sa.Float, nullable=False),
)


def add_column_ddl(column: sa.Column, dialect: sa.Dialect) -> str:
    """The ALTER TABLE that adds this nullable column, as the dialect spells it (SQL Server's has no COLUMN)."""
    prep = dialect.identifier_preparer
    return (f"ALTER TABLE {prep.format_table(column.table)} {'ADD' if dialect.name == 'mssql' else 'ADD COLUMN'} "
            f"{prep.quote(column.name)} {column.type.compile(dialect=dialect)}")


@dataclass
class Run:
    """One row of the registry."""

    run_id: str
    state: str
    cancel_requested: bool
    spec_json: str
    launched_by: str
    source: str | None
    target: str | None
    model: str | None
    master: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    heartbeat_at: dt.datetime | None
    rows_total: int | None
    rows_done: int
    rows_skipped: int
    rows_per_s: float
    phase: str | None
    error: str | None
    driver_pid: int | None
    driver_host: str | None
    driver_started: float | None
    log_path: str | None
    ui_url: str | None
    timings: str | None = None
    cancel_requested_at: dt.datetime | None = None
    target_key: str | None = None
    rows_removed: int | None = None
    executors: int | None = None
    driver_identity: str | None = None

    @property
    def driver_start(self) -> str | float | None:
        """What tells its driver apart from a later process of its pid (is_alive's `started`)."""
        return self.driver_identity or self.driver_started

    @property
    def active(self) -> bool:
        return self.state not in FINAL_STATES

    @property
    def waits_for_executor(self) -> bool:
        """Whether the run's Spark application has held no executor for a while: it waits for a worker's cores."""
        return self.active and self.phase != WAITING and self.executors == 0

    def duration_s(self, now: dt.datetime | None = None) -> float | None:
        if self.started_at is None:
            return None
        return ((self.ended_at or now or utcnow()) - self.started_at).total_seconds()

    def as_dict(self) -> dict:
        """JSON-ready view (no secrets: the stored spec has a redacted URL)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in out.items():
            if isinstance(value, dt.datetime):
                out[key] = value.isoformat() + "Z"
        out["duration_s"] = self.duration_s()
        out["timings"] = json.loads(self.timings) if self.timings else None
        return out


def new_run_id() -> str:
    """Sortable, unique, short: r-20261128-104512-3fa2c1."""
    return f"r-{utcnow():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


REGISTRY = "the run registry (EMBEDDECK_REGISTRY_URL)"


def _unavailable(context: sa.engine.ExceptionContext) -> None:
    """A registry that stops answering while a process runs is Unavailable (the API's 503, to try again), not a bug:
    its OperationalError had answered 500 "internal". Only a failed connect or a dropped connection: errors of a
    statement keep their own type, and a pooled connection found dead by the pre-ping (which SQLAlchemy passes
    through this event too, with is_pre_ping set) is left to be replaced."""
    if context.is_pre_ping:
        return
    if context.connection is None or context.is_disconnect:  # the engine is there but in a pre-ping
        url = context.engine.url.render_as_string(hide_password=False)
        raise Unavailable(f"{REGISTRY}: {connection_error_message(context.original_exception, url)}")


class Registry:
    """Read and write runs; every method is one short transaction."""

    def __init__(self, url: str | None = None):
        self.url = absolute_url(url or Settings().registry_url)  # runs' drivers, which work elsewhere, get it
        try:  # a registry that does not answer (a wrong password, a server down) had ended every verb in a traceback
            self.engine = check_connection(self.url, create=True)
        except EmbedDeckError as exc:
            raise type(exc)(f"{REGISTRY}: {exc}") from None
        if not sa.event.contains(self.engine, "handle_error", _unavailable):
            sa.event.listen(self.engine, "handle_error", _unavailable)
        self._file = sqlite_file(self.url)
        self._file_id = None
        self._ensure_schema()

    def _ensure_schema(self) -> None:
        self._beside: set[sa.MetaData] = set()  # other modules' tables made in this database file (see ensure)
        adopt_older_names(self.engine, metadata)
        create_missing(self.engine, metadata)
        self._add_new_columns()
        create_missing(self.engine, one_active_run_per_target)
        with self.engine.connect() as conn:
            have_row = conn.execute(sa.select(slots_table.c.name).where(slots_table.c.name == SLOTS_ROW)).first()
        if have_row is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(slots_table.insert().values(name=SLOTS_ROW, decisions=0))
            except sa.exc.IntegrityError:  # another process made it first
                pass
        self._file_id = self._identity()

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._file) if self._file else None
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if st else None

    def _fresh(self) -> None:
        """A SQLite registry deleted (or replaced) under a running process: drop the pooled connections to
        the old file and start the new one, instead of two processes writing two files."""
        if self._file and self._identity() != self._file_id:
            self.engine.dispose()
            self._ensure_schema()

    def ensure(self, tables: sa.MetaData) -> None:
        """Make another module's tables beside the runs, once per database file (not at every call)."""
        self._fresh()
        if tables not in self._beside:
            adopt_older_names(self.engine, tables)
            create_missing(self.engine, tables)
            self._beside.add(tables)

    def _add_new_columns(self) -> None:
        """Registries written by an older EmbedDeck lack newer nullable columns: add them in place."""
        have = {c["name"] for c in sa.inspect(self.engine).get_columns(runs_table.name)}
        with self.engine.begin() as conn:
            for column in runs_table.columns:
                if column.name not in have:
                    conn.execute(sa.text(add_column_ddl(column, self.engine.dialect)))

    def create(self, spec_json: str, launched_by: str, source: str, target: str, model: str,
               master: str, target_key: str | None = None, phase: str = "queued", run_id: str | None = None) -> str:
        """Record a queued run and return its id; Conflict when target_key already has an active run."""
        self._fresh()
        run_id = run_id or new_run_id()
        try:
            with self.engine.begin() as conn:
                conn.execute(runs_table.insert().values(
                    run_id=run_id, state=QUEUED, cancel_requested=False, spec_json=spec_json,
                    launched_by=launched_by, source=source, target=target, model=model, master=master,
                    created_at=utcnow(), rows_done=0, rows_skipped=0, rows_per_s=0.0, phase=phase,
                    target_key=target_key, driver_host=socket.gethostname()))  # its driver runs where it launched
        except sa.exc.IntegrityError:
            active = [r.run_id for r in self.list(active_only=True) if r.target_key == target_key]
            raise Conflict(f"target {target!r} already has an active run ({', '.join(active) or 'just started'}); "
                           "cancel it or wait for it to end") from None
        return run_id

    def _update(self, run_id: str, only_active: bool = True, **values) -> bool:
        stmt = runs_table.update().where(runs_table.c.run_id == run_id)
        if only_active:
            stmt = stmt.where(runs_table.c.state.not_in(FINAL_STATES))
        with self.engine.begin() as conn:
            return conn.execute(stmt.values(**values)).rowcount > 0

    def set_driver(self, run_id: str, pid: int, log_path: str, ui_url: str | None = None) -> None:
        """Remember the driver process so a dead one can be detected."""
        self._update(run_id, driver_pid=pid, driver_host=socket.gethostname(),
                     driver_identity=process_identity(pid), log_path=log_path, ui_url=ui_url)

    def waiting(self) -> list[Run]:
        """Queued runs held back, oldest first, launched on this host: only its home holds their URL. On ACA the
        dashboard's and the API's apps share one registry, and a reader of the one would take the other's waiting
        runs and fail them for want of their connection."""
        here = socket.gethostname()
        return sorted((r for r in self.list(limit=1000, active_only=True)
                       if r.phase == WAITING and r.driver_host in (None, here)), key=lambda r: r.created_at)

    def vouch(self, run_ids: list[str]) -> None:
        """Renew the heartbeat of these waiting runs (a reader of the host that keeps their URL is alive), at most
        every VOUCH_EVERY_S: other hosts' readers fail a waiting run whose host has stopped vouching."""
        if not run_ids:
            return
        now = utcnow()
        beat = runs_table.c.heartbeat_at
        stmt = (runs_table.update()
                .where(runs_table.c.run_id.in_(run_ids), runs_table.c.state == QUEUED, runs_table.c.phase == WAITING,
                       sa.or_(beat.is_(None), beat < now - dt.timedelta(seconds=VOUCH_EVERY_S)))
                .values(heartbeat_at=now))
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def take_waiting(self, run_id: str, cap: int) -> bool:
        """Move a waiting run to queued for its caller to start, if fewer than cap runs are started; one decision
        at a time, whoever asks. False when the cap is full or another caller took the run."""
        phase = runs_table.c.phase
        started = sa.select(sa.func.count()).select_from(runs_table).where(
            runs_table.c.state.not_in(FINAL_STATES), sa.or_(phase.is_(None), phase != WAITING))
        take = (runs_table.update().where(runs_table.c.run_id == run_id, runs_table.c.state == QUEUED,
                                          runs_table.c.phase == WAITING)
                .values(phase=QUEUED, heartbeat_at=utcnow()))
        self._fresh()
        with self.engine.begin() as conn:
            conn.execute(slots_table.update().where(slots_table.c.name == SLOTS_ROW)
                         .values(decisions=slots_table.c.decisions + 1))  # the lock, held to the commit
            return conn.execute(started).scalar_one() < cap and conn.execute(take).rowcount == 1

    def claim(self, run_id: str, pid: int, log_path: str, ui_url: str | None = None) -> bool:
        """Take a queued run that no driver has yet, atomically; False when it is not such a run."""
        stmt = (runs_table.update().where(runs_table.c.run_id == run_id, runs_table.c.state == QUEUED,
                                          runs_table.c.driver_pid.is_(None))
                .values(driver_pid=pid, driver_host=socket.gethostname(), driver_identity=process_identity(pid),
                        log_path=log_path, ui_url=ui_url))
        with self.engine.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def set_timings(self, run_id: str, marks: dict[str, float]) -> None:
        """Store the run's start-up marks (seconds since launch), also after it ended."""
        self._update(run_id, only_active=False, timings=json.dumps({k: round(v, 3) for k, v in marks.items()}))

    def start(self, run_id: str, rows_total: int, rows_skipped: int) -> bool:
        """Mark running with the planned totals; False if the run already ended (cancelled). Again after a lost reply
        it changes nothing: the first start's time stays."""
        now = utcnow()
        return self._update(run_id, state=RUNNING, started_at=sa.func.coalesce(runs_table.c.started_at, now),
                            heartbeat_at=now,
                            rows_total=rows_total, rows_skipped=rows_skipped, phase="embedding")

    def set_phase(self, run_id: str, phase: str) -> None:
        self._update(run_id, phase=phase, heartbeat_at=utcnow())

    def beat(self, run_id: str) -> None:
        """Renew the heartbeat of a run whose driver is alive but has no progress to record (it plans, or waits for
        executors): readers on other hosts fail a run whose heartbeat is older than heartbeat_timeout_s()."""
        self._update(run_id, heartbeat_at=utcnow())

    def set_executors(self, run_id: str, executors: int | None) -> None:
        """Record how many executors the run's Spark application holds."""
        self._update(run_id, executors=executors)

    def progress(self, run_id: str, rows_done: int, rows_per_s: float) -> None:
        """Record progress and a heartbeat, plus a sample for the throughput chart."""
        now = utcnow()
        if self._update(run_id, rows_done=rows_done, rows_per_s=rows_per_s, heartbeat_at=now):
            with self.engine.begin() as conn:
                conn.execute(progress_table.insert().values(
                    run_id=run_id, at=now, rows_done=rows_done, rows_per_s=rows_per_s))

    def finish(self, run_id: str, state: str, error: str | None = None, **values) -> bool:
        """Move an active run to a final state; a run already final is left as it is."""
        assert state in FINAL_STATES
        return self._update(run_id, state=state, error=error, ended_at=utcnow(), phase=state,
                            **values)

    def request_cancel(self, run_id: str) -> None:
        """Mark the run for cancelling (the first request's time is kept); its driver acts on it."""
        self._update(run_id, cancel_requested=True)
        stmt = (runs_table.update().where(runs_table.c.run_id == run_id, runs_table.c.cancel_requested_at.is_(None))
                .values(cancel_requested_at=utcnow()))
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def get(self, run_id: str) -> Run | None:
        self._fresh()
        with self.engine.connect() as conn:
            row = conn.execute(runs_table.select().where(runs_table.c.run_id == run_id)).mappings().first()
        return Run(**row) if row else None

    def list(self, limit: int = 200, active_only: bool = False) -> list[Run]:
        """Runs, newest first."""
        self._fresh()
        stmt = runs_table.select().order_by(runs_table.c.created_at.desc()).limit(limit)
        if active_only:
            stmt = stmt.where(runs_table.c.state.not_in(FINAL_STATES))
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).mappings().all()
        return [Run(**r) for r in rows]

    def samples(self, run_id: str) -> list[tuple[dt.datetime, int, float]]:
        """Progress samples of a run, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(progress_table.c.at, progress_table.c.rows_done,
                                          progress_table.c.rows_per_s)
                                .where(progress_table.c.run_id == run_id)
                                .order_by(progress_table.c.at)).all()
        return [tuple(r) for r in rows]

    def reconcile(self) -> list[str]:
        """Mark failed every active run whose driver is gone; returns their ids. Reads the active runs
        only, and writes only for a run that is found dead."""
        failed = []
        host = socket.gethostname()
        now = utcnow()
        for run in self.list(limit=1000, active_only=True):
            reason = driver_gone_reason(run, host, now)
            if reason and self.finish(run.run_id, FAILED, error=reason):
                failed.append(run.run_id)
        return failed


def heartbeat_timeout_s() -> float:
    """How old a heartbeat may be before readers on other hosts take its driver or host for gone: a minute, or half a
    minute more than runs wait for a database that stopped answering (EMBEDDECK_DB_OUTAGE_S). On ACA the registry is
    that database: no heartbeat is written while they wait, and a reader there could fail a run as it came back."""
    return max(HEARTBEAT_TIMEOUT_S, Settings().number("EMBEDDECK_DB_OUTAGE_S") + HEARTBEAT_TIMEOUT_S / 2)


def driver_gone_reason(run: Run, host: str, now: dt.datetime) -> str | None:
    """Why the run's driver is known to be dead, or None while it may be alive."""
    timeout = heartbeat_timeout_s()
    if run.driver_pid is None:
        if run.phase == WAITING:
            # It waits for a free slot or the run service, by design (lifecycle.dispatch starts it), on the host that
            # keeps its URL. Only another host's run can be stranded: an ACA replica that launched it and is gone.
            beat = run.heartbeat_at or run.created_at
            if run.driver_host in (None, host) or (now - beat).total_seconds() <= timeout:
                return None
            return (f"it waited to start, and {run.driver_host}, the host that launched it and alone keeps its "
                    f"connection, has not been seen for {timeout:g}s (gone?); launch it again")
        if (now - run.created_at).total_seconds() > timeout:
            return "the run was never started by a driver process"
        return None
    if run.driver_host == host:
        if is_alive(run.driver_pid, run.driver_start):
            return None
        return f"driver process {run.driver_pid} exited without reporting an end (killed or crashed)"
    beat = run.heartbeat_at or run.created_at
    if (now - beat).total_seconds() > timeout:
        return f"no heartbeat from the driver on {run.driver_host} for {timeout:g}s"
    return None
