"""A run's lifecycle, the one way every door starts and stops runs: validate once → record → hand to the
master's warm run service or a spark-submit of its own → cancel (asked now, settled later) → rerun → wait.

No function here blocks on a run except `wait` and `cancel_and_wait`, which a door calls only where its
caller waits anyway (the CLI, the API's cancel route); the dashboard never does.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from jobs.core.errors import BadRequest, Conflict, EmbedDeckError, NotFound, Unavailable
from jobs.core.processes import is_alive, stop_group, write_private
from jobs.core.settings import Settings
from jobs.core.spec import RunSpec
from jobs.embed.encoder import absolute_model, model_path
from jobs.spark import run_service
from jobs.spark.jvm import scratch_root
from jobs.spark.submit import DRIVER_SCRATCH_PREFIX, check_master, start_driver
from jobs.store import connections, db
from jobs.store.registry import CANCELLED, FAILED, WAITING, Registry, Run, new_run_id

log = logging.getLogger("embeddeck.lifecycle")

# A driver that has not acted on a cancel within this time is stopped (its process group killed).
CANCEL_GRACE_S = 20.0


def resolve_master(requested: str | None = None) -> str:
    """The master a run goes to: the one asked for, else $EMBEDDECK_SPARK_MASTER, else the master whose
    run service is up (`make run`, `python -m cluster up`), else local[*]."""
    if requested:
        return requested
    configured = Settings().raw("EMBEDDECK_SPARK_MASTER")
    if configured:
        return configured
    service = run_service.info()
    return service["master"] if service else "local[*]"


def validate(spec: RunSpec) -> tuple[RunSpec, db.Tables]:
    """Everything checked before a run is recorded: shape, settings, connection, catalog, model, master. Returns the
    spec to record, its tables and columns named as the catalog spells them, and those tables."""
    spec.check_shape()
    Settings().check_values()  # its driver reads them: Spark refused a bad memory size before the run could say why
    engine = db.check_connection(spec.db_url)
    tables = db.inspect_run(engine, spec)
    if not spec.endpoint:
        model_path(spec.model)
    check_master(spec.master)
    # Absolute: the run's driver works in a folder of its own; and one key per target, one model per target, however
    # a path or the model was written.
    recorded = replace(db.spelled_as_catalog(spec, tables), db_url=db.absolute_url(spec.db_url),
                       model=spec.model if spec.endpoint else absolute_model(spec.model))
    return recorded, tables


def health(timeout_s: float = 3.0) -> dict[str, str]:
    """Whether the default database, the run registry and the master answer within timeout_s each: "ok", or why
    not."""
    out = {}
    for name, check in (("database", lambda: db.check_connection(Settings().db_url, timeout_s)),
                        ("registry", lambda: db.check_connection(Settings().registry_url, timeout_s, create=True)),
                        ("master", lambda: check_master(resolve_master(), timeout_s))):
        try:
            check()
            out[name] = "ok"
        except EmbedDeckError as exc:
            out[name] = str(exc)
    return out


def record(spec: RunSpec, registry: Registry) -> str:
    """Record the spec validate returned as a waiting run (URL redacted) and start it, unless EMBEDDECK_MAX_ACTIVE_RUNS
    runs are started or the run service is still starting; returns its id. Conflict when its target has an active
    run."""
    redacted = db.redact_url(spec.db_url)
    while True:
        run_id = new_run_id()
        # The URL first: once recorded, any reader may start the run, and reads it here. A file of its own: an id
        # drawn twice in a second (24 random bits) had shared one, and the second launch, refused by the registry
        # for the id, removed the file of the first, whose start then failed ("its connection is gone").
        try:
            _keep_url(run_id, spec.db_url)
        except FileExistsError:
            continue
        try:
            registry.create(spec.with_db_url(redacted).to_json(), spec.launched_by, spec.source, spec.target,
                            spec.model, spec.master, target_key=db.target_key(spec.db_url, spec.target),
                            phase=WAITING, run_id=run_id)
        except Conflict:
            _waiting_url_path(run_id).unlink(missing_ok=True)
            if registry.get(run_id) is not None:  # the id was taken (by another host's run), not the target
                continue
            raise
        break
    _start_waiting(run_id, spec.master, registry)
    return run_id


def _max_active() -> int:
    return Settings().integer("EMBEDDECK_MAX_ACTIVE_RUNS")


def _start_waiting(run_id: str, master: str, registry: Registry) -> bool:
    """Start a waiting run if this caller takes it within the cap; False when the cap is full, another reader
    took it, or the run service is still starting (it waits on)."""
    # The launcher and every reader (the API's settle loop and its requests, the dashboard) race for waiting
    # runs: the registry decides under one lock. Before, each counted the started runs on its own, so a burst of
    # launches all started, and a second reader handed an e2e run over again and gave it a driver of its own.
    if not registry.take_waiting(run_id, _max_active()):
        return False
    path = _waiting_url_path(run_id)
    try:
        db_url = path.read_text()
    except OSError:
        registry.finish(run_id, FAILED, error="the run waited for a slot, but its connection is gone")
        return False
    if not _hand_over(run_id, db_url, master, registry):
        registry.set_phase(run_id, WAITING)  # the run service is still starting: the next reader tries
        return False
    path.unlink(missing_ok=True)
    return True


def _hand_over(run_id: str, db_url: str, master: str, registry: Registry) -> bool:
    """Start the run in the run service, else in a driver of its own; False (not started) while the service of
    master is still starting: the run's own application would ask for the cores the service is about to take,
    and wait for them for ever (an e2e run once waited 900 s so)."""
    # The real URL (it may hold a password) goes to the driver only: over the service's 0600 socket,
    # or through the environment of the run's own driver process.
    if run_service.submit(run_id, db_url, master):
        return True
    if run_service.starting(master):
        return False
    start_driver(run_id, db_url, master, registry)
    return True


def _waiting_url_path(run_id: str) -> Path:
    return Settings().home / "secrets" / f"waiting-{run_id}.url"


def _keep_url(run_id: str, db_url: str) -> None:
    """A waiting run's real URL, owner-only, until it is handed to the run's driver; FileExistsError when another
    run's file has this id."""
    write_private(_waiting_url_path(run_id), db_url, new=True)


def dispatch(registry: Registry) -> list[str]:
    """Start this host's waiting runs, oldest first, while fewer than the cap are started, and vouch for the rest
    (their URLs are kept here), so no other host takes them for stranded; returns the ids started."""
    started, left = [], []
    for run in registry.waiting():
        (started if _start_waiting(run.run_id, run.master, registry) else left).append(run.run_id)
    registry.vouch([run_id for run_id in left if _waiting_url_path(run_id).exists()])
    return started


def launch(spec: RunSpec, registry: Registry | None = None) -> str:
    """Validate once, record and start a run; returns its id at once."""
    return record(validate(spec)[0], registry or Registry())


def get(run_id: str, registry: Registry) -> Run:
    """The run, with the registry's view of dead drivers and overdue cancels brought up to date."""
    refresh(registry)
    run = registry.get(run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return run


def refresh(registry: Registry) -> None:
    """Settle what only a reader can notice: drivers that died, drivers that ignored a cancel, and waiting runs
    whose slot came free."""
    registry.reconcile()
    now, here = db.utcnow(), socket.gethostname()
    waiting = False
    active = registry.list(limit=1000, active_only=True)
    for run in active:
        if run.phase == WAITING and run.cancel_requested:  # never started: nothing to stop
            registry.finish(run.run_id, CANCELLED, error="cancelled by request before it started")
            _waiting_url_path(run.run_id).unlink(missing_ok=True)
            continue
        waiting = waiting or run.phase == WAITING
        overdue = run.cancel_requested_at and (now - run.cancel_requested_at).total_seconds() > CANCEL_GRACE_S
        # A driver on another host is its own host's to stop (or the heartbeat check's to declare dead): its pid
        # here could be any process of ours.
        if overdue and run.driver_host in (None, here):
            if run.driver_pid and not run_service.serves(run) and is_alive(run.driver_pid, run.driver_start):
                stop_group(run.driver_pid, run.driver_pid, grace_s=5.0)  # never the run service
            registry.finish(run.run_id, CANCELLED, error="cancelled by request (the driver did not stop in time)")
    if waiting:
        dispatch(registry)
    _forget_run_files(registry, {run.run_id for run in active})


def settle_forever(registry: Registry, stop: threading.Event, every_s: float = 2.0) -> None:
    """Refresh every every_s seconds until stop is set. The API and the dashboard server each run this loop: a
    waiting run's URL lives only on the host that launched it, so that host must start it when a slot frees,
    whether or not a request comes or a page is open."""
    while True:
        try:
            refresh(registry)
        except Exception as exc:  # the next round tries again; the door that runs the loop is unaffected
            log.warning("settling runs failed: %s", exc)
        if stop.wait(every_s):
            return


def _forget_run_files(registry: Registry, active_ids: set[str]) -> None:
    """Remove what ended runs left on this host's disk: the kept URL of a run that ended without being handed over
    (cancelled while waiting, perhaps by another host's reader), and the scratch of a run's own driver that did not
    clean up after itself (killed), which holds the run's broadcast secrets. A password must not outlive its run."""
    home = Settings().home
    left = [(path, path.name.removeprefix("waiting-").removesuffix(".url"))
            for path in (home / "secrets").glob("waiting-*.url")]
    left += [(path, path.name.removeprefix(DRIVER_SCRATCH_PREFIX))
             for path in scratch_root(home).glob(f"{DRIVER_SCRATCH_PREFIX}*")]
    for path, run_id in left:
        if run_id in active_ids:  # read just now: no query per file at every refresh
            continue
        run = registry.get(run_id)
        # A missing run may be one being recorded right now, or another registry's; a driver that is still
        # exiting removes its own scratch.
        if run is None or run.active or is_alive(run.driver_pid, run.driver_start):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def cancel(run_id: str, registry: Registry | None = None) -> str:
    """Ask for the run to be cancelled and return at once with its state; the driver cancels its Spark
    jobs within seconds, and one that does not is stopped after CANCEL_GRACE_S."""
    registry = registry or Registry()
    run = get(run_id, registry)
    if run.active:
        registry.request_cancel(run_id)
    return run.state


def wait(run_id: str, registry: Registry | None = None, every_s: float = 1.0, timeout_s: float | None = None,
         on_tick: Callable[[Run], None] | None = None) -> Run:
    """Follow a run until it ends (or timeout_s passes); on_tick sees it at each poll."""
    registry = registry or Registry()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    away_since = None
    while True:
        try:
            run = get(run_id, registry)
        except Unavailable:  # the registry fails over or restarts under a run that waits for it: so does its follower
            away_since = away_since or time.monotonic()
            if time.monotonic() - away_since > Settings().number("EMBEDDECK_DB_OUTAGE_S"):
                raise
            time.sleep(every_s)
            continue
        away_since = None
        if on_tick:
            on_tick(run)
        if not run.active or (deadline is not None and time.monotonic() > deadline):
            return run
        time.sleep(every_s)


def cancel_and_wait(run_id: str, registry: Registry | None = None) -> str:
    """Cancel and wait until the run has ended (at most the grace time and a few polls); its final state."""
    registry = registry or Registry()
    cancel(run_id, registry)
    return wait(run_id, registry, every_s=0.5, timeout_s=CANCEL_GRACE_S + 10).state


def rerun(run_id: str, configured: Mapping[str, str], launched_by: str, registry: Registry | None = None) -> str:
    """Launch a run again with the same spec, against the configured connection its redacted URL names."""
    registry = registry or Registry()
    stored = RunSpec.from_json(get(run_id, registry).spec_json)
    url = connections.resolve(stored.db_url, dict(configured))
    if url is None:
        raise BadRequest(f"no configured connection matches {stored.db_url}; add it to the environment or secrets")
    return launch(replace(stored, db_url=url, launched_by=launched_by), registry)
