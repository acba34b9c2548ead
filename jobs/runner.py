"""The warm run service: one long-lived Spark application that executes runs as job groups.

A run in its own spark-submit pays a JVM, a Spark application, executors, Python workers and a
model load before its first vector. Against a standing cluster the runner pays them once: its
executors and their Python workers (with the model cached) stay up between runs, so a run starts
within a second or two. The launcher hands it a run over a Unix socket in EmbedDeck's home (mode
0600), because the database URL may carry a password that must never be stored or logged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from jobs import db

log = logging.getLogger("embeddeck.runner")

ACCEPT_TIMEOUT_S = 5.0


def _paths() -> tuple[Path, Path]:
    home = db.default_home()
    return home / "runner.sock", home / "runner.json"


def info() -> dict | None:
    """The live runner's pid, master and UI (and warm_s, warm_executors once executors hold the model), or None."""
    sock, state = _paths()
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return None
    import psutil

    try:
        alive = psutil.Process(data["pid"]).create_time() == data["pid_started"]
    except psutil.Error:
        alive = False
    return data if alive and sock.exists() else None


def submit(run_id: str, db_url: str, master: str) -> bool:
    """Hand a queued run to the runner serving master; False when there is none (or it refuses)."""
    current = info()
    if current is None or current["master"] != master:
        return False
    sock_path, _ = _paths()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(ACCEPT_TIMEOUT_S)
            conn.connect(str(sock_path))
            conn.sendall(json.dumps({"run_id": run_id, "db_url": db_url}).encode() + b"\n")
            reply = conn.makefile("rb").readline()
    except OSError as exc:
        log.warning("runner at %s did not take run %s: %s", sock_path, run_id, exc)
        return False
    return json.loads(reply or b"{}").get("ok") is True


def start(master: str, timeout_s: float = 120.0) -> dict:
    """Start the runner application against a spark:// master and wait until it takes runs."""
    from jobs.launcher import REPO, free_port, spark_conf, spark_env, spark_submit

    current = info()
    if current is not None:
        if current["master"] == master:
            return current
        stop()
    _paths()[1].unlink(missing_ok=True)
    cmd = [spark_submit(), "--conf", f"spark.ui.port={free_port()}", "--conf", "spark.scheduler.mode=FAIR"]
    for key, value in spark_conf(master).items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += [str(REPO / "jobs" / "runner.py")]
    log_path = db.default_home() / "runner.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=spark_env(), cwd=str(REPO), start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = info()
        if current is not None:
            return current
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    _kill_group(proc.pid, proc.pid)
    raise RuntimeError(f"the run service did not start within {timeout_s:.0f} s; see {log_path}")


def stop() -> None:
    """Stop the runner (its active runs are marked failed by the registry's dead-driver check)."""
    current = info()
    sock_path, state_path = _paths()
    if current is not None:
        _kill_group(current["pgid"], current["pid"])
    sock_path.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)


def serves(run) -> bool:
    """Whether the run's driver is the runner (which must never be killed for one run)."""
    current = info()
    return current is not None and run.driver_pid == current["pid"]


def _kill_group(pgid: int, pid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the service's process group (spark-submit's JVM leads it), SIGKILL if pid outlives grace_s."""
    import psutil

    try:
        os.killpg(pgid, signal.SIGTERM)
        psutil.Process(pid).wait(grace_s)
    except psutil.TimeoutExpired:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, psutil.Error):
        pass


def _serve_run(sc, registry, run_id: str, db_url: str) -> None:
    from jobs.pipeline import execute, spark_error_message
    from jobs.runs import FAILED
    from jobs.spec import RunSpec

    try:
        spec = RunSpec.from_json(registry.get(run_id).spec_json).with_db_url(db_url)
        execute(sc, spec, registry, run_id)
    except Exception as exc:
        registry.finish(run_id, FAILED, error=spark_error_message(exc))


def _write_state(path: Path, data: dict) -> None:
    """Replace the state file at once, so info() never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _executor_ids(sc) -> frozenset[str]:
    ids = sc._jsc.sc().getExecutorIds().mkString(",")
    return frozenset(filter(None, ids.split(",")))


def _warm_executors(sc, state: dict, state_path: Path, settle_s: float = 2.0, every_s: float = 0.5) -> None:
    """Load the default model in a Python worker per executor core whenever new executors register (at
    start, after a scale-up), before any run asks for it: the first run then starts as fast as later
    ones instead of paying ~10 s for Python workers and the model. Workers scaled to zero: nothing to do."""
    from jobs.pipeline import warm_partitions
    from jobs.spec import DEFAULT_MODEL

    warm, seen, changed = frozenset(), frozenset(), time.monotonic()
    while True:
        time.sleep(every_s)
        try:
            ids = _executor_ids(sc)
        except Exception:  # the JVM is gone; the service is on its way out
            return
        if ids != seen:
            seen, changed = ids, time.monotonic()
        warm &= ids  # executors that left
        if not ids - warm or time.monotonic() - changed < settle_s:
            continue
        slots = sc.defaultParallelism
        sc.setJobGroup("warm-up", f"EmbedDeck warm-up: load {DEFAULT_MODEL} in {slots} Python workers")
        t0, warm = time.perf_counter(), ids  # tried once per executor: a failed warm-up is not retried
        try:
            loads = sc.parallelize(range(slots), slots).mapPartitions(warm_partitions(DEFAULT_MODEL)).collect()
        except Exception as exc:  # it costs the next run its speed, nothing else
            log.warning("warm-up failed: %s", exc)
            continue
        # Counted from the workers that loaded the model, not from the executors Spark lists.
        state.update(warm_s=round(time.perf_counter() - t0, 2), warm_executors=len({pid for pid, _ in loads}))
        _write_state(state_path, state)
        log.info("warmed %d Python workers on %d of %d executors in %.1f s (model load %.1f s at most)",
                 slots, state["warm_executors"], len(ids), state["warm_s"], max(s for _, s in loads))


def _exit_when_orphaned(sc, sock_path: Path, state_path: Path, every_s: float = 2.0, misses: int = 3) -> None:
    """Leave when the application stopped or its master stopped answering: a standalone app does not
    re-register with a restarted master, so the service would take runs it can never run. Gone, the
    launcher falls back to a spark-submit per run and the next `cluster up` starts a fresh service."""
    from jobs.errors import Unavailable
    from jobs.launcher import check_master

    missed = 0
    while missed < misses:
        time.sleep(every_s)
        try:
            if sc._jsc.sc().isStopped():
                break
            check_master(sc.master, timeout_s=every_s)
            missed = 0
        except Unavailable:
            missed += 1
        except Exception:  # the JVM itself is gone
            break
    log.error("the Spark application or its master is gone; the run service exits")
    sock_path.unlink(missing_ok=True)
    state_path.unlink(missing_ok=True)
    os._exit(1)


def main() -> int:
    """spark-submit entry point: hold a SparkContext and run what the launcher hands over."""
    import psutil
    from pyspark import InheritableThread, SparkConf, SparkContext

    from jobs.runs import Registry

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sc = SparkContext(conf=SparkConf().setAppName("embeddeck-runner"))
    registry = Registry()
    sock_path, state_path = _paths()
    sock_path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket carries database URLs: owner only
    try:
        server.bind(str(sock_path))
    finally:
        os.umask(old_umask)
    server.listen(16)
    me = psutil.Process()
    log_path = str(db.default_home() / "runner.log")
    # pgid: spark-submit's JVM leads the group (the launcher starts it in a session of its own).
    state = {"pid": me.pid, "pgid": os.getpgid(0), "pid_started": me.create_time(),
             "master": sc.master, "ui_url": sc.uiWebUrl, "log_path": log_path}
    _write_state(state_path, state)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_exit_when_orphaned, args=(sc, sock_path, state_path), daemon=True).start()
    InheritableThread(target=_warm_executors, args=(sc, state, state_path), daemon=True).start()
    log.info("run service up on %s (UI %s)", sc.master, sc.uiWebUrl)
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    request = json.loads(conn.makefile("rb").readline())
                    run_id, db_url = request["run_id"], request["db_url"]
                    run = registry.get(run_id)
                    if run is None or not run.active:
                        raise ValueError(f"run {run_id} is not queued")
                    registry.set_driver(run_id, me.pid, log_path, sc.uiWebUrl)
                    InheritableThread(target=_serve_run, args=(sc, registry, run_id, db_url), daemon=True).start()
                    conn.sendall(b'{"ok": true}\n')
                    log.info("run %s started", run_id)
                except (ValueError, KeyError, OSError) as exc:
                    conn.sendall(json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n")
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
