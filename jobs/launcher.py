"""Start and cancel runs: on the warm run service of the master when one is up, else in a spark-submit of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil

from jobs import db, jvm, runner
from jobs.encoder import model_path
from jobs.errors import BadRequest, NotFound, Unavailable
from jobs.pipeline import HOLD_FILE_VAR
from jobs.runs import CANCELLED, Registry
from jobs.spec import RunSpec

REPO = Path(__file__).resolve().parent.parent


def spark_submit() -> str:
    """The spark-submit script of the installed pyspark."""
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


def free_port() -> int:
    """A port free on loopback now (for the driver's UI, so front doors know where it is)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_master(master: str, timeout_s: float = 3.0) -> None:
    """Raise Unavailable unless a spark:// master accepts connections (local masters always do)."""
    if master.startswith("local"):
        return
    parsed = urlparse(master)
    if parsed.scheme != "spark" or not parsed.hostname:
        raise BadRequest(f"master must be local[N] or spark://host:port, not {master!r}")
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 7077), timeout=timeout_s):
            pass
    except OSError as exc:
        raise Unavailable(f"Spark master {master} is unreachable: {exc.strerror or exc}") from None


def validate(spec: RunSpec) -> db.Tables:
    """Everything a front door checks before a run is recorded: shape, catalog, model, master."""
    spec.check_shape()
    engine = db.check_connection(spec.db_url)
    tables = db.inspect_run(engine, spec)
    if not spec.endpoint:
        model_path(spec.model)
    check_master(spec.master)
    return tables


def spark_env(db_url: str | None = None) -> dict[str, str]:
    """Environment of a driver: loopback binding, our Python, our code on the path."""
    env = dict(os.environ)
    env.update({
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
    })
    if db_url:
        env["EMBEDDECK_RUN_DB_URL"] = db_url
    return env


def spark_conf(master: str) -> dict[str, str]:
    """Spark settings every run uses (fixed driver ports when set, as executors on ACA need them)."""
    fixed = {key: os.environ[var] for key, var in (("spark.driver.port", "EMBEDDECK_DRIVER_PORT"),
                                                  ("spark.driver.blockManager.port", "EMBEDDECK_BLOCK_MANAGER_PORT"))
             if os.environ.get(var)}
    java_options = jvm.java_options()
    hold = os.environ.get(HOLD_FILE_VAR)  # fault injection, only where a test or drill sets it
    fixed |= {f"spark.executorEnv.{HOLD_FILE_VAR}": hold} if hold else {}
    return fixed | {
        "spark.master": master,
        "spark.driver.host": os.environ.get("EMBEDDECK_DRIVER_HOST", "127.0.0.1"),
        "spark.driver.bindAddress": os.environ.get("EMBEDDECK_DRIVER_BIND", "127.0.0.1"),
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.extraJavaOptions": java_options,
        "spark.executor.extraJavaOptions": java_options,
        "spark.python.worker.reuse": "true",
        "spark.python.daemon.module": "jobs.spark_daemon",
        "spark.pyspark.python": sys.executable,
        "spark.executorEnv.PYTHONPATH": str(REPO),
        "spark.executorEnv.EMBEDDECK_TORCH_THREADS": os.environ.get("EMBEDDECK_TORCH_THREADS", "1"),
        "spark.executorEnv.HF_HUB_OFFLINE": "1",
        "spark.task.maxFailures": "4",
        "spark.executor.memory": os.environ.get("EMBEDDECK_EXECUTOR_MEMORY", "1g"),
        "spark.sql.warehouse.dir": str(db.default_home() / "spark-warehouse"),
        "spark.master.rest.enabled": "false",
    }


def launch(spec: RunSpec, registry: Registry | None = None) -> str:
    """Validate, record a queued run and start its driver; returns the run id at once."""
    validate(spec)
    registry = registry or Registry()
    stored = spec.with_db_url(db.redact_url(spec.db_url))
    run_id = registry.create(stored.to_json(), spec.launched_by, spec.source, spec.target,
                             spec.model, spec.master)
    if runner.submit(run_id, spec.db_url, spec.master):
        return run_id  # the warm run service of this master took it
    log_dir = db.default_home() / "runs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{run_id}.log"
    ui_port = free_port()
    cmd = [spark_submit(), "--conf", f"spark.ui.port={ui_port}"]
    for key, value in spark_conf(spec.master).items():
        cmd += ["--conf", f"{key}={value}"]
    cmd += [str(REPO / "jobs" / "pipeline.py"), "--run-id", run_id]
    env = spark_env(spec.db_url)
    env["EMBEDDECK_REGISTRY_URL"] = registry.url
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(REPO), start_new_session=True)
    registry.set_driver(run_id, proc.pid, str(log_path), f"http://127.0.0.1:{ui_port}")
    # Reap the child when it exits so it never lingers as a zombie of a long-lived front door.
    threading.Thread(target=proc.wait, daemon=True).start()
    return run_id


def cancel(run_id: str, registry: Registry | None = None, grace_s: float = 20.0) -> str:
    """Ask the driver to cancel its Spark jobs; kill its process group if it does not stop in time."""
    registry = registry or Registry()
    run = registry.get(run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if not run.active:
        return run.state
    registry.request_cancel(run_id)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        run = registry.get(run_id)
        if not run.active:
            return run.state
        if run.driver_pid is None or not psutil.pid_exists(run.driver_pid):
            break
        time.sleep(0.5)
    if run.driver_pid and not runner.serves(run):  # never kill the run service for one run
        try:
            os.killpg(run.driver_pid, signal.SIGTERM)
            time.sleep(2)
            os.killpg(run.driver_pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    registry.finish(run_id, CANCELLED, error="cancelled by request")
    return registry.get(run_id).state
