"""A real Spark standalone cluster on this machine: master and worker processes bound to 127.0.0.1.

pip's pyspark has no sbin scripts, so the daemons start through bin/spark-class. Their pids live in
state files under EmbedDeck's home, so a restarted dashboard finds the cluster it left.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cluster import spark_rest
from cluster.backend import Worker, configured_pricing
from jobs.core.cost import Pricing
from jobs.core.errors import BadRequest, Unavailable
from jobs.core.processes import (
    exclusive,
    free_port,
    is_alive,
    port_taken,
    process_identity,
    read_json,
    started_at,
    stop_groups,
    write_json,
)
from jobs.core.settings import REPO, Settings
from jobs.spark import jvm
from jobs.store import scaling, worker_readings


@dataclass
class Proc:
    """A daemon we started: its pid, when it started (shown), and its process identity (to tell it from a later
    process of its pid; None in an older EmbedDeck's state file, which has only the start time)."""

    pid: int
    started: float
    port: int
    webui_port: int
    log: str
    identity: str | None = None

    def alive(self) -> bool:
        return is_alive(self.pid, self.identity or self.started)


class LocalCluster:
    """Master plus N workers as local processes; state under <home>/cluster. A Backend."""

    name = "local"

    def __init__(self, home: Path | None = None, master_port: int | None = None,
                 webui_port: int | None = None, worker_cores: int | None = None,
                 worker_memory: str | None = None):
        settings = Settings()
        self.home = home or settings.home
        self.dir = self.home / "cluster"
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.master_port = master_port or settings.integer("EMBEDDECK_MASTER_PORT")
        self.webui_port = webui_port or settings.integer("EMBEDDECK_MASTER_WEBUI_PORT")
        self.worker_cores = worker_cores or settings.integer("EMBEDDECK_WORKER_CORES")
        self.worker_memory = worker_memory or settings.size("EMBEDDECK_WORKER_MEMORY")

    # state files -------------------------------------------------------------------------
    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def _load(self, name: str) -> Proc | None:
        data = read_json(self._path(name))
        try:
            return Proc(**data) if isinstance(data, dict) else None
        except TypeError:
            return None

    def _save(self, name: str, proc: Proc) -> None:
        write_json(self._path(name), asdict(proc))

    def _forget(self, name: str) -> None:
        """Forget a daemon that has stopped, with what it and its executors left in its scratch (a killed
        executor leaves the broadcasts of the runs it served, their secrets among them)."""
        self._path(name).unlink(missing_ok=True)
        jvm.clear_scratch(self.home, name)

    def _worker_names(self) -> list[str]:
        return sorted((p.stem for p in self.dir.glob("worker-*.json")), key=lambda s: int(s.split("-")[1]))

    # processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], port: int, webui_port: int) -> Proc:
        jvm.ensure_auth_secret()  # before spark_env, which passes it to the daemon
        jvm.clear_scratch(self.home, name)  # a predecessor of this name that died with the machine
        # Executors' block directories live under their worker's scratch (Spark's local dirs follow java.io.tmpdir).
        options = jvm.java_options(jvm.scratch_dir(self.home, name))
        # No secret of EmbedDeck's in a daemon's environment: executors (anyone's code) inherit it.
        env = jvm.spark_env() | {"SPARK_NO_DAEMONIZE": "1",
                                 "SPARK_DAEMON_JAVA_OPTS": f"{options} {jvm.AUTH_OPTIONS}",
                                 "SPARK_MASTER_OPTS": "-Dspark.master.rest.enabled=false -Dspark.port.maxRetries=0",
                                 "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=true"}
        log = self.dir / "logs" / f"{name}.log"
        with open(log, "ab") as out:
            p = subprocess.Popen([jvm.spark_class(), *args], stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        proc = Proc(p.pid, time.time(), port, webui_port, str(log), process_identity(p.pid))
        self._save(name, proc)
        return proc

    def _start_publisher(self, name: str, pid: int) -> None:
        """The worker's telemetry sidecar; it exits by itself when the worker does."""
        log = self.dir / "logs" / f"{name}.telemetry.log"
        with open(log, "ab") as out:
            subprocess.Popen([sys.executable, "-m", "cluster.telemetry", "--worker", name, "--pid", str(pid),
                              "--dir", str(worker_readings.store_dir(self.home))],
                             stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
                             env=jvm.spark_env(), start_new_session=True)

    @property
    def master_webui(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.master_port}"

    def adopt_master(self, pid: int) -> None:
        """Hold a master started outside this backend, on this backend's ports, as this cluster's: the container's
        entrypoint starts its own in the foreground, and the dashboard beside it said "Spark master is down"."""
        identity = process_identity(pid)
        if identity is None:
            raise Unavailable(f"no process {pid} to hold as this cluster's Spark master")
        with self._changing():
            self._save("master", Proc(pid, started_at(pid), self.master_port, self.webui_port, "", identity))

    def master_alive(self) -> bool:
        proc = self._load("master")
        return proc is not None and proc.alive()

    def master_state(self) -> spark_rest.MasterState:
        """The master's own view, or an unreachable state when it is down."""
        if not self.master_alive():
            return spark_rest.MasterState(reachable=False, error="master is not running")
        return spark_rest.master_state(self.master_webui)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """One change to this cluster's daemons at a time, across processes (the autoscaler, the dashboard, the CLI):
        two `scale 2` at once each started the workers they found missing, and a third JVM ran untracked."""
        with exclusive(self.dir / "changes.lock"):
            yield

    def up(self, workers: int | None = None, timeout: float = 60.0) -> spark_rest.MasterState:
        """Start the master if it is not running, then scale to `workers`. None: a running master keeps its workers
        (an `up` to make sure of the master stopped every one, and the tasks on them); a master started now comes
        with none."""
        if workers is not None:
            scaling.check_workers(workers)
        with self._changing():
            self._up(workers, timeout)
        return self.master_state()

    def _up(self, workers: int | None, timeout: float) -> None:
        started = not self.master_alive()
        if started:
            # Spark would bind the next free port and say so only in its log, so that everything else dialled
            # another program, or another EmbedDeck home's master (its own secret: refused).
            for port, var in ((self.master_port, "EMBEDDECK_MASTER_PORT"),
                              (self.webui_port, "EMBEDDECK_MASTER_WEBUI_PORT")):
                if port_taken(port):
                    raise Unavailable(f"port {port} is in use by another program (another EmbedDeck home's Spark "
                                      f"master?): set {var} to a free port")
            self._spawn("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                   "--port", str(self.master_port), "--webui-port", str(self.webui_port)],
                        self.master_port, self.webui_port)
            deadline = time.monotonic() + timeout
            while not spark_rest.master_state(self.master_webui, timeout=1).reachable:
                if not self.master_alive():
                    raise Unavailable(f"Spark master exited at start; see {self.dir / 'logs' / 'master.log'}")
                if time.monotonic() > deadline:
                    raise Unavailable(f"Spark master did not answer within {timeout:.0f}s")
                time.sleep(0.5)
        if started and workers is None:
            # Workers that outlived the last master register with this one only at their next retry (30-90 s apart
            # after the first minute), and it kills their executors then: they go, and the autoscaler starts fresh ones.
            workers = 0
        if workers is not None:
            self._scale(workers, timeout)

    def scale(self, n: int, timeout: float = 60.0) -> list[Worker]:
        """Start or stop worker processes until n are alive and registered with the master."""
        with self._changing():
            self._scale(n, timeout)
        return self.workers()

    def _scale(self, n: int, timeout: float) -> None:
        if n < 0:
            raise BadRequest(f"worker count must be 0 or more, not {n}")
        if n > 0 and not self.master_alive():
            raise Unavailable("the Spark master is not running; start it with `python -m cluster up`")
        names = self._worker_names()
        for name in names:  # forget workers that died on their own
            proc = self._load(name)
            if proc is None or not proc.alive():
                self._forget(name)
        self._stop(self._worker_names()[n:])
        used = {int(x.split("-")[1]) for x in self._worker_names()}
        index = 0
        while len(self._worker_names()) < n:
            while index in used:
                index += 1
            used.add(index)
            webui = self.webui_port + 1 + index
            name, port = f"worker-{index}", free_port()
            # A fixed RPC port tells this worker apart from a dead predecessor the master still lists.
            # Executors' directories and logs in our home, not in the pyspark package (Spark's default, never
            # cleaned); the worker removes a stopped application's after spark.worker.cleanup.appDataTtl (7 days).
            proc = self._spawn(name, ["org.apache.spark.deploy.worker.Worker", self.master_url(),
                                      "--host", "127.0.0.1", "--port", str(port), "--cores", str(self.worker_cores),
                                      "--memory", self.worker_memory, "--webui-port", str(webui),
                                      "--work-dir", str(self.dir / "work")], port, webui)
            self._start_publisher(name, proc.pid)
        self._wait_registered(n, timeout)

    def _wait_registered(self, n: int, timeout: float) -> None:
        if not self.master_alive():
            return
        deadline = time.monotonic() + timeout
        ours = {p.port for name in self._worker_names() if (p := self._load(name))}
        while True:
            state = spark_rest.master_state(self.master_webui, timeout=1)
            alive = {w.port for w in state.workers if w.state == "ALIVE"}
            if state.reachable and ours <= alive and len(ours) == n:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"{len(ours & alive)} workers registered after {timeout:.0f}s, wanted {n}")
            time.sleep(0.5)

    def workers(self) -> list[Worker]:
        """Our worker processes, joined with the master's view of each (ALIVE/DEAD)."""
        state = self.master_state()
        by_port = {w.port: w for w in state.workers if w.state == "ALIVE"}
        out = []
        for name in self._worker_names():
            proc = self._load(name)
            if proc is None:
                continue
            seen = by_port.get(proc.port)
            if not proc.alive():
                status = "DEAD"
            else:
                status = seen.state if seen else "STARTING"
            out.append(Worker(name, status, seen.cores if seen else self.worker_cores,
                              seen.memory_mb if seen else None, proc.started, f"pid {proc.pid}"))
        return out

    def pricing(self) -> Pricing:
        """Each local worker holds its cores."""
        return configured_pricing("core", float(self.worker_cores))

    def utilisation(self) -> list[worker_readings.Reading]:
        """The readings each worker's telemetry sidecar publishes."""
        return worker_readings.read_all(worker_readings.store_dir(self.home))

    def worker_pids(self) -> dict[str, int]:
        """Pid of each worker process we started (telemetry walks their process trees)."""
        return {name: p.pid for name in self._worker_names() if (p := self._load(name)) and p.alive()}

    def down(self) -> None:
        """Stop every worker and the master."""
        with self._changing():
            self._stop([*self._worker_names(), "master"])

    def _stop(self, names: list[str]) -> None:
        """Stop these daemons together and forget them."""
        procs = {name: proc for name in names if (proc := self._load(name)) and proc.alive()}
        stop_groups({proc.pid: proc.pid for proc in procs.values()})
        for name in names:
            self._forget(name)
