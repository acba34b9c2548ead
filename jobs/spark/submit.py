"""spark-submit plumbing: the settings every Spark application of ours uses, its command line, a master
reachability check, and a run's own driver process."""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

from jobs.core.errors import Unavailable
from jobs.core.processes import UNIX_PATH_MAX, free_port
from jobs.core.settings import HOLD_FILE_VAR, REPO, Settings
from jobs.core.spec import check_master_url, in_process
from jobs.spark.jvm import auth_secret, java_options, scratch_dir, spark_env, spark_submit
from jobs.store.registry import Registry

DRIVER_SCRIPT = REPO / "jobs" / "spark" / "driver.py"


HOLD_S = 0.5  # a master keeps a silent connection open; a proxy with nothing behind it closes it at once


def check_master(master: str, timeout_s: float = 3.0, hold_s: float | None = None) -> None:
    """Raise Unavailable unless a spark:// master accepts connections (local masters always do) and keeps them open
    hold_s: by default HOLD_S where a proxy may stand in front of it (Container Apps' ingress accepts a connection for
    a master that is gone, then closes it) and 0 on this host."""
    check_master_url(master)
    if in_process(master):
        return
    parsed = urlparse(master)
    hold = (HOLD_S if may_be_proxied(parsed.hostname) else 0.0) if hold_s is None else hold_s
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s) as conn:
            closed = hold > 0 and _closes_within(conn, hold)
    except OSError as exc:
        raise Unavailable(f"Spark master {master} is unreachable: {exc.strerror or exc}") from None
    if closed:
        raise Unavailable(f"Spark master {master} is unreachable: the connection was closed at once (a proxy with no "
                          "master behind it)")


@functools.lru_cache(maxsize=64)  # asked at every check of a master (every 2 s by each driver's watch)
def may_be_proxied(host: str) -> bool:
    """Whether a connection to host may reach a proxy rather than the server: anywhere but this host's loopback."""
    try:
        return not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except OSError:  # not resolvable here: whatever answers is elsewhere
        return True


def _closes_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the peer closes a connection we opened and wrote nothing on within seconds (a master never does); a
    reset raises."""
    conn.settimeout(seconds)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False


def same_master(a: str, b: str) -> bool:
    """Whether two master URLs name one master: spark://localhost:7077 and spark://127.0.0.1:7077 are one."""

    def canonical(master: str) -> str:
        parsed = urlparse(master)
        if parsed.scheme != "spark" or not parsed.hostname:
            return master
        try:
            host = socket.gethostbyname(parsed.hostname)
        except OSError:
            host = parsed.hostname
        return f"spark://{host}:{parsed.port or 7077}"

    return canonical(a) == canonical(b)


# Spark names its Unix sockets <java.io.tmpdir>/.<uuid>.sock, and a socket's path takes at most 107 bytes.
SOCKET_NAME_BYTES = len("/.") + 36 + len(".sock")


def unix_sockets_fit(scratch: Path | None) -> bool:
    """Whether Spark's Unix sockets fit in a JVM's scratch (else its Python workers talk over loopback TCP)."""
    return len(os.fsencode(str(scratch or tempfile.gettempdir()))) + SOCKET_NAME_BYTES <= UNIX_PATH_MAX


def spark_conf(master: str, scratch: Path | None = None) -> dict[str, str]:
    """Spark settings every run uses (fixed driver ports when set, as executors on ACA need them); scratch: the
    driver's (jvm.scratch_dir)."""
    settings = Settings()
    fixed = {key: str(settings.integer(var)) for key, var in (("spark.driver.port", "EMBEDDECK_DRIVER_PORT"),
                                                              ("spark.driver.blockManager.port",
                                                               "EMBEDDECK_BLOCK_MANAGER_PORT"))
             if settings.raw(var)}
    hold = settings.raw(HOLD_FILE_VAR)  # fault injection, only where a test or drill sets it
    fixed |= {f"spark.executorEnv.{HOLD_FILE_VAR}": hold} if hold else {}
    if master.startswith("spark://") and auth_secret():
        # The cluster admits only applications that hold its secret, and its traffic is encrypted.
        fixed |= {"spark.authenticate": "true", "spark.network.crypto.enabled": "true"}
    return fixed | {
        "spark.master": master,
        "spark.driver.host": settings.raw("EMBEDDECK_DRIVER_HOST"),
        "spark.driver.bindAddress": settings.raw("EMBEDDECK_DRIVER_BIND"),
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.extraJavaOptions": java_options(scratch),
        # An executor starts in its own work directory (<work-dir>/<app>/<executor>), which its worker removes with
        # the application's data; its block directories are its worker's (under the worker's scratch).
        "spark.executor.extraJavaOptions": java_options(Path(".")),
        "spark.python.worker.reuse": "true",
        # Python workers, and the driver's Python, talk to their JVM over Unix sockets: over loopback TCP each task
        # waited 33-41 ms for its first input, and a 100-row run took 36 ms longer. An executor's are in its work
        # directory ("."), a driver's in its scratch.
        "spark.python.unix.domain.socket.enabled": str(unix_sockets_fit(scratch)).lower(),
        "spark.python.daemon.module": "jobs.spark.daemon",
        "spark.pyspark.python": sys.executable,
        "spark.executorEnv.PYTHONPATH": str(REPO),
        "spark.executorEnv.EMBEDDECK_TORCH_THREADS": settings.raw("EMBEDDECK_TORCH_THREADS"),
        "spark.executorEnv.HF_HUB_OFFLINE": "1",
        "spark.task.maxFailures": "4",
        "spark.executor.memory": settings.size("EMBEDDECK_EXECUTOR_MEMORY"),
        "spark.sql.warehouse.dir": str(settings.home / "spark-warehouse"),
        "spark.master.rest.enabled": "false",
    }


def app_conf(name: str):
    """The SparkConf of one of our applications: its name, and the cluster's secret set here in the driver
    (Spark needs it as configuration for a standalone master; here it shows in no command line, and Spark's
    UI redacts it)."""
    from pyspark import SparkConf

    conf = SparkConf().setAppName(name)
    secret = auth_secret()
    if secret:  # used only where spark.authenticate is on (spark_conf turns it on for spark:// masters)
        conf.set("spark.authenticate.secret", secret)
    return conf


def command(script: Path, master: str, ui_port: int, scratch: Path, extra: dict[str, str] | None = None,
            args: tuple[str, ...] = ()) -> list[str]:
    """The spark-submit command line of one of our applications (a run's driver, the run service)."""
    cmd = [spark_submit(), "--conf", f"spark.ui.port={ui_port}"]
    for key, value in (spark_conf(master, scratch) | (extra or {})).items():
        cmd += ["--conf", f"{key}={value}"]
    return [*cmd, str(script), *args]


def start(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a Spark program in a process group of its own, output to log_path; reaped when it exits."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=str(REPO), start_new_session=True)
    # Reap the child when it exits so it never lingers as a zombie of a long-lived front door.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


DRIVER_SCRATCH_PREFIX = "run-"  # a run's own driver owns the jvm.scratch_dir "run-<run id>"


def start_driver(run_id: str, db_url: str, master: str, registry: Registry) -> int:
    """Start the run's own spark-submit driver; returns its pid (the leader of its process group)."""
    ui_port = free_port()
    home = Settings().home
    log_path = home / "runs" / f"{run_id}.log"
    cmd = command(DRIVER_SCRIPT, master, ui_port, scratch_dir(home, f"{DRIVER_SCRATCH_PREFIX}{run_id}"),
                  args=("--run-id", run_id))
    proc = start(cmd, log_path, spark_env(db_url, secrets_too=True) | {"EMBEDDECK_REGISTRY_URL": registry.url})
    registry.set_driver(run_id, proc.pid, str(log_path), f"http://127.0.0.1:{ui_port}")
    return proc.pid
