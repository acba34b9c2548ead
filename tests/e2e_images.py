"""`make e2e`: the deployment's topology run from the built images, as the images' own user.

- the controller image's entrypoint in `trigger` mode (Spark master, run service, HTTP API);
- worker-image processes, each with a scratch folder bind-mounted as /data (the Azure Files share on ACA);
- a real PostgreSQL holding the source rows, the vectors and the run registry (EMBEDDECK_REGISTRY_URL, as on ACA);
- a poller that plays KEDA's metrics-api scaler with the rule `python -m cluster deploy` writes for the worker
  app (url path, valueLocation, targetValue, bearer auth with the autoscale token, min and max replicas)
  and starts and stops worker containers as ACA would start and stop replicas.

Containers run with `buildah run --isolation chroot` on the host's network, each on its own ports of
127.0.0.1. The poller polls every 2 s and cools down after 10 s (ACA: 30 s and 300 s) so the test ends soon.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

from jobs.core.autoscale import ScalingSettings
from jobs.core.processes import free_port
from jobs.core.progress import start_breakdown
from jobs.store import scaling
from jobs.store.demo import seed_demo
from jobs.store.registry import Registry
from tests import postgres
from tests.conftest import check_table, responds, wait_until

CONTROLLER, WORKER = "localhost/embeddeck-controller:dev", "localhost/embeddeck-worker:dev"
ROWS = int(os.environ.get("E2E_ROWS", "400"))
POLL_S, COOLDOWN_S = 2.0, 10.0
RUNTIME_UID = 10001


class Container:
    """One process from an image: `buildah from` + `buildah run` of the image's entrypoint, stopped as a group."""

    def __init__(self, image: str, name: str, env: dict[str, str], volumes: dict[Path, str], log: Path):
        self.name = subprocess.run(["buildah", "from", "-q", "--name", name, image], check=True,
                                   capture_output=True, text=True).stdout.strip()
        args = ["buildah", "run", "--isolation", "chroot"]
        for key, value in env.items():
            args += ["--env", f"{key}={value}"]
        for src, dst in volumes.items():
            args += ["-v", f"{src}:{dst}"]
        self.log = log
        self.proc = subprocess.Popen([*args, self.name, "--", "/app/docker/entrypoint.sh"],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """Stop the entrypoint's group, then whatever else runs in this container's root: chroot isolation has
        no PID namespace, and the run service and a run's driver start sessions of their own (a driver once
        outlived its container)."""
        inside = []
        if self.proc.poll() is None:  # read before the stop: buildah unmounts the root when its run ends
            roots = {root for p in psutil.Process(self.proc.pid).children(recursive=True)
                     if (root := _root_of(p.pid)) not in (None, "/")}
            inside = [p for p in psutil.process_iter() if _root_of(p.pid) in roots]
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        strays = [p for p in inside if p.is_running()]
        for p in strays:
            p.terminate()
        for p in psutil.wait_procs(strays, timeout=10)[1]:
            p.kill()
        subprocess.run(["buildah", "rm", self.name], capture_output=True)

    def tail(self, path: str, lines: int = 40) -> str:
        """The last lines of a file inside the running container (a failure's evidence, read before stop)."""
        out = subprocess.run(["buildah", "run", "--isolation", "chroot", self.name, "--", "tail", "-n", str(lines),
                              path], capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr


def _root_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:  # gone, or not ours to read
        return None


def in_image(image: str, command: str) -> str:
    """A command's output inside an image, as the image's user."""
    ctr = subprocess.run(["buildah", "from", "-q", image], check=True, capture_output=True, text=True).stdout.strip()
    try:
        return subprocess.run(["buildah", "run", "--isolation", "chroot", ctr, "--", "bash", "-c", command],
                              check=True, capture_output=True, text=True).stdout.strip()
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


class KedaMetricsApi:
    """KEDA's metrics-api scaler and the replica controller behind it, for the worker app's one rule."""

    def __init__(self, rule: dict, min_replicas: int, max_replicas: int, token: str, controller_base: str,
                 start_replica, stop_replica):
        self.url = controller_base + urlparse(rule["metadata"]["url"]).path  # ACA's ingress routes the FQDN here
        self.value_location, self.target = rule["metadata"]["valueLocation"], float(rule["metadata"]["targetValue"])
        assert rule["metadata"]["authMode"] == "bearer" and rule["auth"][0]["triggerParameter"] == "token"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.min, self.max = min_replicas, max_replicas
        self.start_replica, self.stop_replica = start_replica, stop_replica
        self.replicas: list[Container] = []
        self.counts = [0]
        self.moved_at = [time.monotonic()]  # when each count in counts was reached
        self.last_active = 0.0
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def desired(self) -> int:
        answer = requests.get(self.url, headers=self.headers, timeout=5)
        answer.raise_for_status()
        value = float(answer.json()[self.value_location])
        now = time.monotonic()
        if value > 0:  # activation: above activationTargetValue (default 0)
            self.last_active = now
            return max(self.min, min(self.max, math.ceil(value / self.target)))
        # Inactive: replicas stay until the cooldown has passed since the trigger was last active.
        return len(self.replicas) if now - self.last_active < COOLDOWN_S else self.min

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                want = self.desired()
                while len(self.replicas) < want:
                    self.replicas.append(self.start_replica(len(self.replicas)))
                while len(self.replicas) > want:
                    self.stop_replica(self.replicas.pop())
                if self.counts[-1] != len(self.replicas):
                    self.counts.append(len(self.replicas))
                    self.moved_at.append(time.monotonic())
            except Exception as exc:  # a poll that fails is retried, as KEDA does
                self.errors.append(repr(exc))
            self.stopping.wait(POLL_S)


def keda_rule() -> tuple[dict, int, int]:
    """The worker app's scale rule and bounds as `python -m cluster deploy` writes them."""
    from cluster import deploy

    config, _ = deploy.AcaConfig.from_env(allow_missing=True)
    scale = deploy.worker_app(config).template.scale
    return scale.rules[0].custom.as_dict(), scale.min_replicas, scale.max_replicas


def main() -> int:
    for image in (CONTROLLER, WORKER):
        if subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True).returncode:
            raise SystemExit(f"e2e: {image} is not built; run `make images`")
    uid = in_image(WORKER, "id -u")
    drivers = in_image(WORKER, "python -c 'import pyodbc; print(pyodbc.drivers())'")
    assert uid == str(RUNTIME_UID), f"the worker image runs as uid {uid}, not {RUNTIME_UID}"
    assert "ODBC Driver 18 for SQL Server" in drivers, drivers
    print(f"worker image: uid {uid}, pyodbc.drivers() = {drivers}")

    scratch = Path(tempfile.mkdtemp(prefix="embeddeck-e2e-"))
    share, logs = scratch / "share", scratch / "logs"
    share.mkdir()
    logs.mkdir()
    os.chown(share, RUNTIME_UID, RUNTIME_UID)  # the share is the runtime user's, as ACA mounts it
    api_token, autoscale_token, spark_secret = (secrets.token_hex(16) for _ in range(3))
    master_port, webui_port, api_port = free_port(), free_port(), free_port()
    master = f"spark://127.0.0.1:{master_port}"
    containers: list[Container] = []
    keda, controller, last_seen = None, None, {}
    try:
        with postgres.server() as db_url:
            seed_demo(db_url, n=ROWS)
            registry = Registry(db_url)  # the registry in the run's own database, as on ACA
            scaling.save_settings(ScalingSettings(autoscale=True, min_workers=0, max_workers=2, idle_timeout_s=5),
                                  registry)
            common = {"EMBEDDECK_HOME": "/home/embeddeck/state", "EMBEDDECK_TELEMETRY_DIR": "/data/embeddeck/telemetry",
                      "_SPARK_AUTH_SECRET": spark_secret, "SPARK_LOCAL_IP": "127.0.0.1", "HOME": "/home/embeddeck"}
            controller = Container(CONTROLLER, f"e2e-controller-{os.getpid()}", {
                **common, "APP_MODE": "trigger", "EMBEDDECK_API_TOKEN": api_token,
                "EMBEDDECK_AUTOSCALE_TOKEN": autoscale_token, "EMBEDDECK_DB_URL": db_url,
                "EMBEDDECK_REGISTRY_URL": db_url, "EMBEDDECK_SPARK_MASTER": master,
                "SPARK_MASTER_PORT": str(master_port), "SPARK_MASTER_WEBUI_PORT": str(webui_port),
                "EMBEDDECK_API_PORT": str(api_port)}, {share: "/data"}, logs / "controller.log")
            containers.append(controller)
            api = f"http://127.0.0.1:{api_port}"
            wait_until(lambda: responds(f"{api}/healthz"), timeout=180, every=1, what="the controller's API")
            wait_until(lambda: responds(f"http://127.0.0.1:{webui_port}/json/"), timeout=60, every=1,
                       what="the controller's Spark master")

            def start_replica(i: int) -> Container:
                replica = Container(WORKER, f"e2e-worker-{i}-{os.getpid()}", {
                    **common, "APP_MODE": "worker", "SPARK_MASTER_URL": master, "HOSTNAME": f"e2e-worker-{i}",
                    "SPARK_WORKER_CORES": "1", "SPARK_WORKER_MEMORY": "2g",
                    # On the share, so that the executors' own logs outlive the replica for a failure's report.
                    "SPARK_WORKER_DIR": f"/data/spark-work/{i}",
                    "SPARK_WORKER_WEBUI_PORT": str(free_port())}, {share: "/data"}, logs / f"worker-{i}.log")
                containers.append(replica)
                return replica

            def stop_replica(replica: Container) -> None:
                replica.stop()
                containers.remove(replica)

            rule, lo, hi = keda_rule()
            keda = KedaMetricsApi(rule, lo, hi, autoscale_token, api, start_replica, stop_replica)
            threading.Thread(target=keda.run, daemon=True).start()

            auth = {"Authorization": f"Bearer {api_token}"}
            assert requests.get(f"{api}/runs", headers={"Authorization": f"Bearer {autoscale_token}"},
                                timeout=5).status_code == 401, "the autoscale token must not read runs"
            posted = requests.post(f"{api}/runs", headers=auth, timeout=30, json={
                "source": "products", "id_column": "id", "text_column": "description", "target": "e2e_embeddings"})
            assert posted.status_code == 202, posted.text
            run_id = posted.json()["run_id"]
            t0 = time.monotonic()

            def finished():
                run = last_seen["run"] = requests.get(f"{api}/runs/{run_id}", headers=auth, timeout=5).json()
                return run if run["state"] in ("succeeded", "failed", "cancelled") else None

            run = wait_until(finished, timeout=900, every=2, what=f"run {run_id}")
            assert run["state"] == "succeeded", run
            print(f"run {run_id}: {run['rows_done']}/{ROWS} rows in {time.monotonic() - t0:.0f}s "
                  f"from the POST; worker counts so far {keda.counts}")
            # Where the start went, for a slow one's report: scaler moves since the POST, then the run's own stages.
            print("scaler: " + ", ".join(f"{n} at {at - t0:+.1f} s" for n, at in zip(keda.counts, keda.moved_at)
                                         if at >= t0))
            apps = requests.get(f"http://127.0.0.1:{webui_port}/json/", timeout=5).json()
            names = [a["name"] for a in apps.get("activeapps", []) + apps.get("completedapps", [])]
            assert names == ["embeddeck-runner"], f"the run service alone must have run it: {names}"
            stages = start_breakdown(json.loads(registry.get(run_id).timings or "{}"))
            print("start stages: " + " + ".join(f"{name} {s:.1f}" for name, s in stages.items()))
            wait_until(lambda: keda.counts[-1] == 0 and len(keda.counts) > 2, timeout=180, every=1,
                       what="workers back to 0")
            keda.stopping.set()

            from sentence_transformers import SentenceTransformer

            from jobs.embed.encoder import model_path

            check_table(db_url, SentenceTransformer(model_path("all-MiniLM-L6-v2"), device="cpu"), ROWS,
                        target="e2e_embeddings")
            moves = " -> ".join(str(n) for n in keda.counts)
            assert max(keda.counts) == 2, moves
            print(f"e2e: {run['rows_done']}/{ROWS} rows embedded through the images; workers {moves}")
            return 0
    except BaseException:
        if "run" in last_seen:
            run = last_seen["run"]
            print("last run record: " + json.dumps({k: run.get(k) for k in ("state", "phase", "rows_done",
                                                                             "rows_total", "error")}), file=sys.stderr)
        for log in sorted(logs.glob("*.log")) + sorted(share.glob("spark-work/*/app-*/*/std*")):
            print(f"--- {log.relative_to(scratch)} (last lines)\n"
                  + "\n".join(log.read_text(errors="replace").splitlines()[-25:]), file=sys.stderr)
        if controller is not None and controller in containers:
            print("--- the controller's run service log (last lines)\n"
                  + controller.tail("/home/embeddeck/state/runner.log", 80), file=sys.stderr)
        if keda and keda.errors:
            print("scaler errors: " + json.dumps(keda.errors[-5:]), file=sys.stderr)
        raise
    finally:
        if keda:
            keda.stopping.set()
        for c in reversed(containers):
            c.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
