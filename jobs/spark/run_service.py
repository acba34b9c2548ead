"""The warm run service: one long-lived Spark application that executes runs as job groups.

A run in its own spark-submit pays a JVM, a Spark application, executors, Python workers and a
model load before its first vector. Against a standing cluster the service pays them once: its
executors and their Python workers (with the model cached) stay up between runs, so a run starts
within a second or two. The lifecycle hands it a run over a Unix socket in EmbedDeck's home (mode
0600), because the database URL may carry a password that must never be stored or logged.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from jobs.core.errors import Unavailable
from jobs.core.processes import (
    exclusive,
    free_port,
    is_alive,
    process_identity,
    read_json,
    stop_group,
    stops_deferred,
    unix_address,
    write_json,
)
from jobs.core.settings import Settings
from jobs.core.spec import DEFAULT_MODEL, RunSpec
from jobs.embed.pipeline import execute, spark_error_message, warm_partitions
from jobs.spark import master_watch
from jobs.spark.jvm import clear_scratch, scratch_dir, spark_env
from jobs.spark.python_path import use_installed_pyspark
from jobs.spark.submit import app_conf, check_master, command, same_master
from jobs.spark.submit import start as start_app
from jobs.store import db
from jobs.store.registry import FAILED, Registry

log = logging.getLogger("embeddeck.run_service")

# A client that connects and says nothing is dropped after CONNECTION_TIMEOUT_S, well before a real
# client, waiting in the backlog meanwhile, gives up at SUBMIT_TIMEOUT_S.
CONNECTION_TIMEOUT_S, SUBMIT_TIMEOUT_S = 1.0, 10.0
WARM_ATTEMPTS = 5
START_TIMEOUT_S = 120.0  # spark-submit until the service takes runs
SCRIPT = Path(__file__).resolve()
SCRATCH_OWNER = "runner"  # its jvm.scratch_dir


def _paths() -> tuple[Path, Path]:
    home = Settings().home
    return home / "runner.sock", home / "runner.json"


def _starting_path() -> Path:
    return Settings().home / "runner.starting.json"


def starting(master: str) -> bool:
    """Whether a start of the service of master is under way (its starter still waits for it to take runs)."""
    data = read_json(_starting_path())
    return (isinstance(data, dict) and is_alive(data.get("pid"), data.get("pid_started"))
            and same_master(data.get("master", ""), master))


def info() -> dict | None:
    """The live service's pid, master and UI (and warm_s, warm_executors, warmed_at once executors hold the
    model), or None."""
    sock, state = _paths()
    data = read_json(state)
    if not isinstance(data, dict) or not is_alive(data.get("pid"), data.get("pid_started")):
        return None
    return data if sock.exists() else None


def submit(run_id: str, db_url: str, master: str) -> bool:
    """Hand a queued run to the service of master; False when there is none (or it refuses)."""
    current = info()
    if current is None or not same_master(current["master"], master):
        return False
    sock_path, _ = _paths()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(SUBMIT_TIMEOUT_S)
            with unix_address(sock_path) as address:
                conn.connect(address)
            conn.sendall(json.dumps({"run_id": run_id, "db_url": db_url}).encode() + b"\n")
            reply = conn.makefile("rb").readline()
    except OSError as exc:
        log.warning("run service at %s did not take run %s: %s", sock_path, run_id, exc)
        return False
    return json.loads(reply or b"{}").get("ok") is True


def _wait_for_master(master: str, deadline: float) -> None:
    """Return once master accepts connections and holds them open (Container Apps' ingress accepts for a master not
    listening yet); Unavailable past deadline. An application that dials a master not yet listening is retried by
    Spark's standalone client only 20 s later: the controller image starts its master and this service together,
    and its first run waited those 20 s (e2e)."""
    while True:
        try:
            check_master(master, timeout_s=1.0)
            return
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _changing():
    """One start or stop of the service at a time per home: the dashboard's Start master, `make run`'s keeper and
    the CLI may ask together (two starts ran two services)."""
    return exclusive(Settings().home / "runner.lock")


def start(master: str, timeout_s: float = START_TIMEOUT_S) -> dict:
    """Start the service application against a spark:// master and wait until it takes runs."""
    with _changing():
        return _start(master, timeout_s)


def keep(master: str, stopping: threading.Event | None = None, every_s: float = 5.0) -> None:
    """Start the service, and again whenever it is gone while its master answers (killed, crashed: runs then went
    to applications of their own, and on ACA raced for the controller's fixed driver ports), until stopping is
    set. A stopped master is left stopped; its service starts with it again (backends.start_all)."""
    stopping, first = stopping or threading.Event(), True
    while not stopping.is_set():
        if info() is None and not starting(master) and (first or _answers(master)):
            if not first:
                log.warning("the run service of %s is gone: starting it again", master)
            try:
                with _changing():
                    if not stopping.is_set():  # a stop that waited for this lock comes first
                        _start(master, START_TIMEOUT_S)
            except Unavailable as exc:
                log.error("%s", exc)
        first = False
        stopping.wait(every_s)


def _answers(master: str) -> bool:
    try:
        check_master(master, timeout_s=1.0)
        return True
    except Unavailable:
        return False


def _start(master: str, timeout_s: float) -> dict:
    current = info()
    if current is not None:
        if same_master(current["master"], master):
            return current
        _stop()
    _paths()[1].unlink(missing_ok=True)
    # Runs launched meanwhile wait for the service (lifecycle): a run in a spark-submit of its own would ask
    # the master for the cores the service is about to take, and wait for them for ever.
    starter = os.getpid()
    write_json(_starting_path(), {"pid": starter, "pid_started": process_identity(starter), "master": master})
    try:
        deadline = time.monotonic() + timeout_s
        _wait_for_master(master, deadline)
        home = Settings().home
        log_path = home / "runner.log"
        clear_scratch(home, SCRATCH_OWNER)  # what a service that died on its own left
        proc = None
        try:
            with stops_deferred():
                proc = start_app(command(SCRIPT, master, free_port(), scratch_dir(home, SCRATCH_OWNER),
                                         {"spark.scheduler.mode": "FAIR"}), log_path, spark_env(secrets_too=True))
            while time.monotonic() < deadline:
                current = info()
                if current is not None:
                    return current
                if proc.poll() is not None:
                    raise Unavailable(f"the run service exited at its start (status {proc.returncode}); see {log_path}")
                time.sleep(0.3)
            raise Unavailable(f"the run service did not start within {timeout_s:.0f} s; see {log_path}")
        except BaseException:
            # Timed out, or its starter interrupted (Ctrl-C, SIGTERM): a service that came up unawaited would run
            # unknown to `down`, holding the master's cores.
            if proc is not None:
                stop_group(proc.pid, proc.pid)
            raise
    finally:
        _starting_path().unlink(missing_ok=True)


def stop() -> None:
    """Stop the service (its active runs are marked failed by the registry's dead-driver check)."""
    with _changing():
        _stop()


def _stop() -> None:
    current = info()
    sock_path, state_path = _paths()
    if current is not None:
        stop_group(current["pgid"], current["pid"], grace_s=15.0)
    sock_path.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    clear_scratch(Settings().home, SCRATCH_OWNER)


def serves(run) -> bool:
    """Whether the run's driver is the run service (which must never be killed for one run)."""
    current = info()
    return current is not None and run.driver_pid == current["pid"]


# How often a run's end that the registry did not take is offered again.
END_RETRY_S = 1.0


def _serve_run(sc, registry, run_id: str, db_url: str) -> None:
    try:
        spec = RunSpec.from_json(registry.get(run_id).spec_json).with_db_url(db_url)
        execute(sc, spec, registry, run_id, executors=functools.partial(master_watch.executor_count, sc))
    except Exception as exc:
        error, told = spark_error_message(exc), False
        # Until the registry takes it: readers here go by whether a run's driver lives, and this service outlives
        # its runs, so a failed run whose end was lost with the registry read "running" for as long as it served.
        while True:
            try:
                registry.finish(run_id, FAILED, error=error)
                return
            except (Unavailable, DBAPIError) as lost:
                if isinstance(lost, DBAPIError) and not db.transient(lost, registry.engine):
                    log.error("run %s failed, and the registry refused its end: %s", run_id, lost)
                    return
                if not told:
                    log.warning("run %s failed, and its end waits for the registry: %s", run_id, lost)
                    told = True
                time.sleep(END_RETRY_S)


def _warm_executors(sc, state: dict, state_path: Path, settle_s: float = 2.0, every_s: float = 0.5) -> None:
    """Load the default model in a Python worker per executor core whenever new executors register (at
    start, after a scale-up), before any run asks for it: the first run then starts as fast as later
    ones instead of paying ~10 s for Python workers and the model. Workers scaled to zero: nothing to do."""
    warm, seen, changed = frozenset(), frozenset(), time.monotonic()
    while True:
        time.sleep(every_s)
        try:
            ids = master_watch.executor_ids(sc)
        except Exception:  # the JVM is gone; the service is on its way out
            return
        if ids != seen:
            seen, changed = ids, time.monotonic()
        warm &= ids  # executors that left
        if not ids - warm or time.monotonic() - changed < settle_s:
            continue
        slots = sc.defaultParallelism
        sc.setJobGroup("warm-up", f"warm-up: load {DEFAULT_MODEL} in the Python workers of {len(ids)} executors")
        t0, warm = time.perf_counter(), ids  # tried once per executor: a failed warm-up is not retried
        try:
            pids, loads, tasks = set(), [], slots
            # Spark may place every task on the executors that were ready first: go again, wider, until a
            # Python worker of each executor (one daemon each) holds the model.
            for _ in range(WARM_ATTEMPTS):
                loads += sc.parallelize(range(tasks), tasks).mapPartitions(warm_partitions(DEFAULT_MODEL)).collect()
                pids = {pid for pid, _ in loads}
                if len(pids) >= len(ids):
                    break
                tasks *= 2
        except Exception as exc:  # it costs the next run its speed, nothing else
            log.warning("warm-up failed: %s", exc)
            continue
        # Counted from the workers that loaded the model, not from the executors Spark lists.
        state.update(warm_s=round(time.perf_counter() - t0, 2), warm_executors=len(pids), warmed_at=time.time())
        write_json(state_path, state)
        log.info("warmed Python workers on %d of %d executors in %.1f s (model load %.1f s at most)",
                 state["warm_executors"], len(ids), state["warm_s"], max(s for _, s in loads))


def _exit_when_orphaned(sc, registry, sock_path: Path, state_path: Path) -> None:
    """Leave when the application stopped or its master stopped answering: a standalone app does not
    re-register with a restarted master, so the service would take runs it can never run. Its runs in flight
    fail by name first. Gone, the lifecycle falls back to a spark-submit per run and the next `cluster up`
    (or `keep`) starts a fresh service."""
    error = master_watch.lost(sc)
    if error is not None:
        me = os.getpid()
        for run in registry.list(limit=1000, active_only=True):
            if run.driver_pid == me:
                registry.finish(run.run_id, FAILED, error=master_watch.run_lost_message(error))
    log.error("the Spark application or its master is gone (%s); the run service exits", error or "stopped")
    sock_path.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    os._exit(1)


def main() -> int:
    """spark-submit entry point: hold a SparkContext and run what the lifecycle hands over."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    use_installed_pyspark()
    from pyspark import InheritableThread, SparkContext

    sc = SparkContext(conf=app_conf("embeddeck-runner"))
    registry = Registry()
    sock_path, state_path = _paths()
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket carries database URLs: owner only
    try:
        # A home deeper than about 95 bytes made the path too long for an address: the service died at its start
        # ("AF_UNIX path too long"), and so did `cluster up` and `make run`.
        with unix_address(sock_path) as address:
            server.bind(address)
    finally:
        os.umask(old_umask)
    server.listen(16)
    me = os.getpid()
    log_path = str(Settings().home / "runner.log")
    # pgid: spark-submit's JVM leads the group (spark/submit.start gives it a session of its own).
    state = {"pid": me, "pgid": os.getpgid(0), "pid_started": process_identity(me),
             "master": sc.master, "ui_url": sc.uiWebUrl, "log_path": log_path}
    write_json(state_path, state)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_exit_when_orphaned, args=(sc, registry, sock_path, state_path), daemon=True).start()
    InheritableThread(target=_warm_executors, args=(sc, state, state_path), daemon=True).start()
    log.info("run service up on %s (UI %s)", sc.master, sc.uiWebUrl)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                # One slow or silent client must not hold the accept loop for everyone.
                conn.settimeout(CONNECTION_TIMEOUT_S)
                try:
                    request = json.loads(conn.makefile("rb").readline())
                    run_id, db_url = request["run_id"], request["db_url"]
                    # Atomic: only a queued run nobody drives yet is taken, so a run handed over
                    # twice runs once.
                    if not registry.claim(run_id, me, log_path, sc.uiWebUrl):
                        raise ValueError(f"run {run_id} is not queued")
                    InheritableThread(target=_serve_run, args=(sc, registry, run_id, db_url), daemon=True).start()
                    reply = {"ok": True}
                    log.info("run %s started", run_id)
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:  # the client left: its loss, never the service's
                    pass
    finally:
        server.close()
        sock_path.unlink(missing_ok=True)
        state_path.unlink(missing_ok=True)
        try:
            sc.stop()
        except Exception:  # the JVM got the same SIGTERM and may be gone already
            pass


if __name__ == "__main__":
    sys.exit(main())
