"""A real local standalone cluster: scaling, telemetry, Spark REST, and the autoscaler driving it."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster import spark_rest, telemetry
from cluster.controller import Controller
from cluster.local import LocalCluster
from jobs.core.autoscale import ScalingSettings
from jobs.core.errors import Unavailable
from jobs.core.processes import free_port
from jobs.doors.bench import CPU_ROLES, cpu_by_role
from jobs.spark import jvm
from jobs.store import scaling, worker_readings
from jobs.store.demo import seed_demo
from jobs.store.registry import Registry
from jobs.store.scaling import save_settings
from tests.conftest import (
    answer_json,
    check_table,
    files_holding,
    run_service_jvms,
    stopped_while_run_service_starts,
    wait_until,
)

pytestmark = pytest.mark.spark
ROWS = 400


def detached_run(url: str, source: str, target: str, model: str, master: str, registry_url: str) -> str:
    """`python -m jobs run --detach` of source's descriptions into target, recorded in registry_url; its run id."""
    out = subprocess.run([sys.executable, "-m", "jobs", "run", "--db", url, "--source", source, "--id-column", "id",
                          "--text-column", "description", "--target", target, "--model", model, "--master", master,
                          "--detach"], capture_output=True, text=True,
                         env=dict(os.environ, EMBEDDECK_REGISTRY_URL=registry_url))
    assert out.stdout.strip(), out.stderr
    return out.stdout.strip()


def master_jvm(port: int | str) -> psutil.Process:
    """The standalone master's JVM listening on port."""
    return next(p for p in psutil.process_iter(["cmdline"])
                if "org.apache.spark.deploy.master.Master" in (p.info["cmdline"] or [])
                and str(port) in (p.info["cmdline"] or []))


def python_driver(pid: int) -> psutil.Process:
    """The Python process of the spark-submit whose JVM is pid (the process that watches the master)."""
    return next(p for p in psutil.Process(pid).children(recursive=True) if "python" in p.name())


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(home=tmp_path, master_port=free_port(), webui_port=free_port())
    yield c
    c.down()


def test_a_master_port_in_use_is_named_not_moved_past(tmp_path):
    """Spark binds the next free port when its own is taken and says so only in its log: the cluster then dialled
    whatever held the port (another EmbedDeck home's master refuses our secret) and hung."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = other.getsockname()[1]
        cluster = LocalCluster(home=tmp_path, master_port=taken, webui_port=free_port())
        with pytest.raises(Unavailable, match=f"port {taken} is in use by another program .*EMBEDDECK_MASTER_PORT"):
            cluster.up()
    assert not cluster.master_alive()


def test_two_scales_at_once_start_the_workers_once(cluster, tmp_path):
    """The autoscaler, the dashboard and the CLI scale the same cluster from different processes: two `scale 2` at
    once each started the workers they found missing, and a third worker JVM ran untracked (never stopped)."""
    cluster.up(workers=0)
    # The fixture's cluster keeps its state in tmp_path and its Spark secret in the suite's home.
    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_MASTER_PORT=str(cluster.master_port),
               EMBEDDECK_MASTER_WEBUI_PORT=str(cluster.webui_port), **{jvm.AUTH_SECRET_ENV: jvm.auth_secret()})
    procs = [subprocess.Popen([sys.executable, "-m", "cluster", "scale", "2"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(p.wait(timeout=180) == 0 for p in procs), [p.stderr.read() for p in procs]
    jvms = [p for p in psutil.process_iter(["cmdline"])
            if "org.apache.spark.deploy.worker.Worker" in (p.info["cmdline"] or []) and cluster.master_url()
            in p.info["cmdline"]]
    assert len(jvms) == 2 and cluster.master_state().alive_workers == 2 and len(cluster.workers()) == 2


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_an_interrupted_up_says_what_runs_on_and_stops_the_run_service_it_was_starting(cluster, tmp_path, stop):
    """Ctrl-C on `cluster up` ended it in a KeyboardInterrupt traceback, and SIGTERM with no word; either left the
    run service it was starting to come up unawaited, unknown to a `down` run meanwhile (and to the next `up`, which
    started a second one)."""
    cluster.up(workers=0)
    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_MASTER_PORT=str(cluster.master_port),
               EMBEDDECK_MASTER_WEBUI_PORT=str(cluster.webui_port), **{jvm.AUTH_SECRET_ENV: jvm.auth_secret()})
    status, err = stopped_while_run_service_starts(["cluster", "up"], env, tmp_path, stop)
    assert status == 128 + getattr(signal, stop) and "Traceback" not in err, err
    assert err.strip() == ("up interrupted: the master and workers it had started run on (`python -m cluster status` "
                           "shows them, `python -m cluster down` stops them)")
    wait_until(lambda: not run_service_jvms(tmp_path), timeout=15, what="the unawaited run service's end")
    assert cluster.master_state().reachable


def test_a_second_make_run_leaves_the_running_cluster_alone(cluster, tmp_path):
    """A second `make run` found the dashboard's port taken only after it had scaled the running cluster to 0
    workers, and then stopped that cluster on its way out: runs in flight lost their master."""
    cluster.up(workers=1)
    with socket.socket() as first_dashboard:
        first_dashboard.bind(("127.0.0.1", 0))
        first_dashboard.listen()
        port = first_dashboard.getsockname()[1]
        env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_MASTER_PORT=str(cluster.master_port),
                   EMBEDDECK_MASTER_WEBUI_PORT=str(cluster.webui_port), EMBEDDECK_DASHBOARD_PORT=str(port))
        out = subprocess.run([sys.executable, "-m", "dashboard"], env=env, capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 2 and f"port {port} is in use" in out.stderr
    assert "nothing was started or stopped" in out.stderr
    state = cluster.master_state()
    assert state.reachable and state.alive_workers == 1


def test_scale_0_2_1_0_agrees_with_master_json_and_telemetry(cluster, tmp_path):
    assert cluster.master_state().reachable is False and cluster.master_state().error == "master is not running"
    state = cluster.up(workers=0)
    assert state.reachable and state.status == "ALIVE" and state.alive_workers == 0
    for n in (2, 1, 0):
        workers = cluster.scale(n)
        state = cluster.master_state()
        assert state.alive_workers == n == len(workers)
        assert state.cores == n * cluster.worker_cores
        assert sorted(w.state for w in workers) == ["ALIVE"] * n
        if n == 2:
            readings = wait_until(lambda: len(r := cluster.utilisation()) == 2 and r, timeout=30)
            assert {r.worker for r in readings} == {"worker-0", "worker-1"}
            assert all(r.memory_mb > 50 and not r.stale for r in readings)  # a live JVM
            assert all(r.gpus or r.gpu_note.startswith("no NVIDIA GPU") for r in readings)
    # With no workers left, no reading is refreshed: each turns stale once it is older than 3 s.
    stale = wait_until(lambda: (r := worker_readings.read_all(worker_readings.store_dir(tmp_path), stale_after_s=3))
                       and all(x.stale for x in r) and r, timeout=30)
    assert len(stale) == 2

    # A worker killed behind our back is reported DEAD, then replaced by the next scale.
    cluster.scale(1)
    os.killpg(cluster.worker_pids()["worker-0"], 9)
    wait_until(lambda: cluster.workers()[0].state == "DEAD", timeout=10)
    assert cluster.scale(1)[0].state == "ALIVE"


def test_a_worker_s_telemetry_ends_with_the_worker_not_with_its_pid(tmp_path):
    """The sidecar published while the worker's pid existed: a worker dead but not yet reaped by the process that
    started it (a zombie) went on being published, as a worker of no process."""
    worker = subprocess.Popen(["sleep", "60"])
    publisher = threading.Thread(target=telemetry.run_publisher, args=("worker-0", worker.pid, tmp_path, 0.6),
                                 daemon=True)
    publisher.start()
    wait_until(lambda: worker_readings.read_all(tmp_path), timeout=10, what="its first reading")
    worker.kill()  # not reaped until wait(): a zombie meanwhile
    publisher.join(timeout=10)
    assert not publisher.is_alive()
    worker.wait()


def test_nvml_absence_is_reported_not_raised():
    gpus, note = telemetry.read_gpus()
    assert gpus or note.startswith("no NVIDIA GPU")
    for g in gpus:
        assert 0 <= g.utilisation_pct <= 100 and g.memory_total_mb > 0


def test_unreachable_spark_gives_state_not_exception():
    port = free_port()
    assert spark_rest.master_state(f"http://127.0.0.1:{port}", timeout=0.5).reachable is False
    stats = spark_rest.app_stats(f"http://127.0.0.1:{port}", timeout=0.5)
    assert stats.reachable is False and stats.error.startswith("unreachable")


def test_autoscaled_run_survives_a_killed_worker_then_idles_to_zero(cluster, tmp_path, fast_model, fast_reference,
                                                                   hold_file, home):
    """A run submitted to a master with 0 workers gets 2 from the controller; one is SIGKILLed while both
    hold a task (the hold file keeps them there, the tiny model encodes far faster than any real one);
    Spark retries its tasks, every row is embedded exactly once; idleness then brings the cluster to 0, and
    nothing of the run's is left on disk outside the run's table."""
    since = time.time() - 1
    url = f"sqlite:///{tmp_path / 'auto.sqlite'}"
    seed_demo(url, n=ROWS)
    cluster.up(workers=0)
    registry_url = f"sqlite:///{tmp_path / 'registry.sqlite'}"  # this cluster's backlog and settings only
    controller = Controller(cluster, Registry(registry_url))
    save_settings(ScalingSettings(autoscale=True, min_workers=0, max_workers=2, idle_timeout_s=3),
                  controller.registry)
    run_id = detached_run(url, "products", "auto_emb", fast_model, cluster.master_url(), registry_url)
    first = controller.tick()
    assert first.desired == 2 and ("1 run not planned yet" in first.reason or "backlog of" in first.reason)
    assert cluster.master_state().alive_workers == 2

    def both_executors_hold_a_task():
        run = controller.registry.get(run_id)
        assert run.active, run.error
        if run.rows_done == 0:  # still planning, or no commit has landed yet
            return None
        stats = spark_rest.app_stats(run.ui_url) if run.ui_url else None
        busy = [e for e in (stats.executors if stats and stats.reachable else []) if e["id"] != "driver"
                and e["active_tasks"]]
        return len(busy) == 2 and stats

    stats_seen = wait_until(both_executors_hold_a_task, timeout=240, every=1)
    held = controller.registry.get(run_id)
    assert held.state == "running" and 0 < held.rows_done < ROWS
    # Each executor holds the run's broadcast (its database URL) under its worker's scratch, not in /tmp.
    assert files_holding(url, tmp_path / "tmp" / "worker-1")
    os.killpg(cluster.worker_pids()["worker-1"], 9)
    hold_file.unlink()
    wait_until(lambda: (controller.tick(), not controller.registry.get(run_id).active)[1], timeout=300, every=1)
    final = controller.registry.get(run_id)
    assert final.state == "succeeded", final.error
    check_table(url, fast_reference, ROWS, target="auto_emb", model=fast_model)
    assert stats_seen.app_id and stats_seen.name.startswith("embeddeck-")
    # Spark's UI names the jobs after the run, not after the thread that submitted them.
    described = {j["description"] for j in stats_seen.jobs}
    assert f"plan products \u2192 auto_emb ({run_id})" in described
    assert f"embed products \u2192 auto_emb ({run_id})" in described
    wait_until(lambda: controller.tick().desired == 0, timeout=30, every=1)
    assert cluster.master_state().alive_workers == 0
    # What the killed worker's executor left went when the controller replaced it; the rest when workers stopped.
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("worker-")]
    assert files_holding(url, Path(tempfile.gettempdir()), since, skip=(home, tmp_path)) == []
    events = controller.history.events()
    # After the kill the controller restores 2 workers while the backlog lasts, then scales in to 0.
    moves = [(e["from_workers"], e["to_workers"]) for e in events]
    assert moves[0] == (0, 2) and moves[-1][1] == 0 and all(to <= 2 for _, to in moves)
    assert events[-1]["reason"].startswith("idle for")
    # Its cost: the core-seconds of the workers the controller sampled while it ran (at most 2 one-core
    # workers for its whole duration, and some, since two held tasks).
    cost = scaling.cost(controller.registry, final, cluster.pricing())
    assert cost.pricing.unit == "core" and 0 < cost.unit_s <= 2 * final.duration_s() + 1e-6
    assert cost.label().endswith("no price configured")


def test_a_run_that_loses_its_master_fails_by_name_unless_its_executors_can_finish_it(cluster, tmp_path, fast_model,
                                                                                      hold_file):
    """A standalone application never rejoins its master. A run whose driver holds executors finishes without it; a
    run still waiting for executors waited for ever, "queued · planning", its driver alive and logging "Initial job
    has not accepted any resources": it now fails, naming the master, and its driver ends."""
    from dashboard import views
    from jobs.core.processes import is_alive, stop_group
    from jobs.spark.submit import HOLD_S, check_master

    url = f"sqlite:///{tmp_path / 'lost.sqlite'}"
    seed_demo(url, n=ROWS)
    cluster.up(workers=1)
    check_master(cluster.master_url(), hold_s=HOLD_S)  # a master holds a silent connection open
    registry_url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    registry = Registry(registry_url)

    def launch(target: str) -> str:
        return detached_run(url, "products", target, fast_model, cluster.master_url(), registry_url)

    runs = [launch("holding_emb")]  # its executor takes the worker's cores, and the hold file keeps it
    try:
        holding = runs[0]
        wait_until(lambda: registry.get(holding).rows_done > 0, timeout=240, what="the first run's first commit")
        waiting = launch("waiting_emb")
        runs.append(waiting)
        planning = wait_until(lambda: (run := registry.get(waiting)).phase == "planning" and run, timeout=120,
                              what="the second run's driver")
        # Readers on another host (Container Apps' dashboard and API apps share a registry) fail a run whose heartbeat
        # is a minute old: one planning, waiting minutes for workers to start, had none renewed.
        wait_until(lambda: registry.get(waiting).heartbeat_at > planning.heartbeat_at, timeout=10,
                   what="a heartbeat while the run plans")
        # Why it makes no progress, on every door: its application holds no executor (the other holds the cores).
        wait_until(lambda: registry.get(waiting).executors == 0, timeout=30, what="the waiting run's executors")
        assert registry.get(holding).executors == 1
        status = subprocess.run([sys.executable, "-m", "jobs", "status", waiting], capture_output=True, text=True,
                                env=dict(os.environ, EMBEDDECK_REGISTRY_URL=registry_url)).stdout
        assert "(no executor yet)" in status and "waiting: its Spark application holds no executor" in status, status
        assert "(no executor" not in subprocess.run([sys.executable, "-m", "jobs", "status", holding],
                                                    capture_output=True, text=True,
                                                    env=dict(os.environ, EMBEDDECK_REGISTRY_URL=registry_url)).stdout
        page_says = views.waiting_for_workers(registry.get(waiting), cluster.master_state(), ScalingSettings(), "1g")
        assert "holds no executor" in page_says and "1 alive worker are all held by other applications" in page_says, \
            page_says
        master_jvm(cluster.master_port).kill()
        failed = wait_until(lambda: (run := registry.get(waiting)).state != "queued" and run, timeout=60,
                            what="the waiting run's end")
        assert failed.state == "failed", failed.error
        assert failed.error.startswith(f"Spark master {cluster.master_url()} is unreachable"), failed.error
        assert "went away while the run was in flight, and a Spark application never rejoins a master: launch the " \
               "run again once the cluster is up" in failed.error
        wait_until(lambda: not is_alive(failed.driver_pid, failed.driver_start), timeout=30, what="its driver's end")
        assert registry.get(holding).state == "running"
        hold_file.unlink()
        done = wait_until(lambda: (run := registry.get(holding)).state != "running" and run, timeout=180)
        assert done.state == "succeeded" and done.rows_done == ROWS, done.error
        wait_until(lambda: not is_alive(done.driver_pid, done.driver_start), timeout=30, what="its driver's end")
    finally:  # a driver that outlived a failed assertion waits for its lost master for ever
        for run in map(registry.get, runs):
            if is_alive(run.driver_pid, run.driver_start):
                stop_group(run.driver_pid)


def test_a_run_whose_master_restarts_under_it_fails_by_name(cluster, tmp_path, fast_model, hold_file, monkeypatch):
    """A master restarted within seconds knows no application and kills their executors as their workers register
    with it again; the run, its master answering again, then waited for ever with none. Its driver now tells the
    master that listed its application from one that lists it no more, and fails the run by name."""
    from jobs.core.processes import is_alive, stop_group

    monkeypatch.setenv("EMBEDDECK_MASTER_WEBUI_PORT", str(cluster.webui_port))  # where drivers read their master
    url = f"sqlite:///{tmp_path / 'restart.sqlite'}"
    seed_demo(url, n=ROWS)
    cluster.up(workers=1)
    registry_url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    registry = Registry(registry_url)
    run_id = detached_run(url, "products", "restart_emb", fast_model, cluster.master_url(), registry_url)
    try:
        run = wait_until(lambda: (r := registry.get(run_id)).rows_done > 0 and r, timeout=240, what="a first commit")
        # Frozen, the driver's watch cannot miss three checks of the master in a row while it restarts, however slow
        # this machine starts a JVM: the restart falls between two checks, as it does on a fast one.
        driver = python_driver(run.driver_pid)
        driver.suspend()
        try:
            old_master = master_jvm(cluster.master_port)
            old_master.kill()
            old_master.wait(30)
            cluster.up(workers=1)  # the same master again, its worker registered with it
        finally:
            driver.resume()
        failed = wait_until(lambda: (r := registry.get(run_id)).state != "running" and r, timeout=90,
                            what="the run's end")
        assert failed.state == "failed", failed.error
        assert failed.error.startswith(f"Spark master {cluster.master_url()} restarted: it no longer lists "
                                       "application app-"), failed.error
        assert "launch the run again once the cluster is up; it embeds only what is missing" in failed.error
        wait_until(lambda: not is_alive(failed.driver_pid, failed.driver_start), timeout=30, what="its driver's end")
    finally:  # a driver that outlived a failed assertion waits for ever
        run = registry.get(run_id)
        if is_alive(run.driver_pid, run.driver_start):
            stop_group(run.driver_pid)


def test_a_cancel_before_the_runs_first_job_stops_that_job(cluster, pg_url, fast_model):
    """A run is watched from its start; a cancel that came while its driver still read the source (a table lock holds
    it there) was acted on once, before any job existed, and the planning job then waited for ever on a master with
    no worker. The cancel now stops that job too."""
    import sqlalchemy as sa

    from jobs.core.processes import is_alive, stop_group
    from jobs.store import db

    cluster.up(workers=0)
    seed_demo(pg_url, n=ROWS, table="cancel_early")
    registry_url = f"sqlite:///{cluster.home / 'registry.sqlite'}"
    registry = Registry(registry_url)
    with db.engine_for(pg_url).connect() as blocker:
        blocker.execute(sa.text("LOCK TABLE cancel_early IN ACCESS EXCLUSIVE MODE"))
        run_id = detached_run(pg_url, "cancel_early", "cancel_early_emb", fast_model, cluster.master_url(),
                              registry_url)
        wait_until(lambda: registry.get(run_id).heartbeat_at is not None, timeout=120, what="the driver's watch")
        registry.request_cancel(run_id)
        time.sleep(2 * 2.0 + 1)  # the watch's ticks see the cancel while no job exists yet
        assert registry.get(run_id).state == "queued"  # still held by the lock
        blocker.rollback()
    try:
        # Read from the registry alone: a reader (lifecycle.get) would stop an overdue driver itself after 20 s.
        ended = wait_until(lambda: (run := registry.get(run_id)).state != "queued" and run, timeout=60,
                           what="the run's end")
        assert (ended.state, ended.error) == ("cancelled", "cancelled by request before embedding started"), \
            ended.error
    finally:  # a driver left planning on a master without workers waits for ever
        run = registry.get(run_id)
        if is_alive(run.driver_pid, run.driver_start):
            stop_group(run.driver_pid)


def test_a_proxy_that_accepts_for_a_gone_master_is_no_master():
    """Container Apps' ingress is a TCP proxy: it accepts a connection for a master that is gone, then closes it. A
    bare connect took that for a master, and a run's driver would have watched it for ever."""
    import threading

    from jobs.spark.submit import check_master, may_be_proxied

    # Where one may stand: anywhere but this host's loopback (where a check then costs nothing).
    assert not may_be_proxied("127.0.0.1") and not may_be_proxied("localhost")
    assert may_be_proxied("10.0.0.7")
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()

        def accept_and_close():  # the two checks below
            for _ in range(2):
                proxy.accept()[0].close()

        threading.Thread(target=accept_and_close, daemon=True).start()
        url = f"spark://127.0.0.1:{proxy.getsockname()[1]}"
        check_master(url)  # on loopback, a bare connect: it cannot tell
        with pytest.raises(Unavailable, match=f"Spark master {url} is unreachable: the connection was closed at once"):
            check_master(url, hold_s=0.5)


def test_run_service_from_cluster_cli_starts_runs_warm_keeps_the_password_and_survives_a_cancel(
        pg_url, reference_model, fast_model, tmp_path):
    """`python -m cluster up` starts the warm run service with the master; runs handed to it are
    correct, the second finds its Python worker and model already loaded, the database password
    travels over the service's socket only, a cancel stops the run and not the service; `down`
    stops it all."""
    import json

    from jobs import lifecycle
    from jobs.core.progress import start_breakdown
    from jobs.core.settings import Settings
    from jobs.core.spec import RunSpec
    from jobs.spark import run_service
    from jobs.store.db import redact_url

    since = time.time() - 1
    hold = tmp_path / "hold"
    env = dict(os.environ, EMBEDDECK_MASTER_PORT=str(free_port()), EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()),
               EMBEDDECK_FAULT_HOLD_FILE=str(hold))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "cluster", *args], env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr
        return out.stdout

    seed_demo(pg_url, n=ROWS)
    registry = Registry()
    try:
        assert "run service up" in cli("up", "--workers", "1")
        status = json.loads(cli("status", "--json"))
        master = status["master"]["url"]
        assert status["master"]["state"] == "ALIVE" and status["master"]["alive_workers"] == 1
        assert [a["name"] for a in status["master"]["active_apps"]] == ["embeddeck-runner"]
        service = status["runner"]
        assert service["master"] == master and service["pid"] == run_service.info()["pid"]
        # The service loads the model in its executors' Python workers before any run asks for it.
        wait_until(lambda: "warm_s" in (run_service.info() or {}), timeout=120)

        def launch(target, **kw):
            spec = RunSpec(db_url=pg_url, source="products", id_column="id", text_column="description",
                           target=target, master=master, launched_by="test", **kw)
            return lifecycle.launch(spec, registry)

        # The service's socket: a client that connects and leaves at once once killed the service, and one
        # that connects and says nothing held the accept loop for everyone.
        import socket

        sock_path = str(Settings().home / "runner.sock")
        with socket.socket(socket.AF_UNIX) as gone:
            gone.connect(sock_path)
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(sock_path)  # never sends a byte
        first_id = launch("svc_emb", limit_rows=120)  # handed over the same socket, behind the silent one
        silent.close()
        first = lifecycle.wait(first_id, registry)
        # The same run handed over twice more is refused: it ran once.
        assert not run_service.submit(first_id, pg_url, master) and not run_service.submit(first_id, pg_url, master)
        assert first.state == "succeeded", first.error
        assert first.driver_pid == service["pid"]
        # The executor's directory and log are in our home, not in the pyspark package, where nothing cleans them.
        assert list((Settings().home / "cluster" / "work").glob("app-*/*/stderr"))
        first_marks = json.loads(first.timings)
        assert first_marks["worker_started"] < 0 and first_marks["model_load_s"] < 0.05  # warmed, not loaded
        check_table(pg_url, reference_model, 120, "svc_emb")

        second = lifecycle.wait(launch("svc_small", limit_rows=50), registry)
        assert second.state == "succeeded" and second.rows_done == 50
        # The bench's scale_cpu lines: each role names real processes of this cluster (their CPU since they
        # started, which no machine makes zero; a run's own share could be under a clock tick on a fast one).
        used = cpu_by_role()
        assert all(used[role] > 0 for role in CPU_ROLES)
        marks = json.loads(second.timings)
        assert marks["worker_started"] < 0  # the Python worker was up before this run was launched
        assert marks["model_load_s"] < 0.05  # and already held the model (a load takes 0.4 s or more)
        stages = start_breakdown(marks)
        assert stages["jvm"] == stages["spark_app"] == stages["python_worker"] == 0
        # The bench's pipeline_tasks_busy: the tasks' seconds on rows, within the job's seconds on one core.
        assert 0 < marks["tasks_encoding_s"] <= marks["tasks_busy_s"] <= marks["embed_job_s"]

        hold.touch()  # keeps the next run in flight after its first commit, however fast the machine
        busy = launch("svc_busy", model=fast_model)
        wait_until(lambda: registry.get(busy).rows_done > 0, timeout=120)
        # A run planning behind it (its planning job waits for the one core) is cancelled at once, that job with it:
        # the cancel went unheeded until a reader gave up on it after 20 s, while the job waited on, then ran.
        behind = launch("svc_behind", limit_rows=20)
        wait_until(lambda: registry.get(behind).phase == "planning", timeout=60)
        asked = time.monotonic()
        assert lifecycle.cancel_and_wait(behind, registry) == "cancelled"
        assert time.monotonic() - asked < lifecycle.CANCEL_GRACE_S
        assert registry.get(behind).error == "cancelled by request before embedding started"
        assert lifecycle.cancel_and_wait(busy, registry) == "cancelled"
        assert 0 < registry.get(busy).rows_done < ROWS
        hold.unlink()
        assert run_service.info()["pid"] == service["pid"]
        again = lifecycle.wait(launch("svc_again", limit_rows=20), registry)
        assert again.state == "succeeded" and again.driver_pid == service["pid"]

        # A scale-up is warmed too, before any run reaches the new worker.
        assert run_service.info()["warm_executors"] == 1
        cli("scale", "2")
        wait_until(lambda: (run_service.info() or {}).get("warm_executors") == 2, timeout=120)
        assert run_service.info()["pid"] == service["pid"]

        password = "s3cret-pg"
        assert password in pg_url and password not in redact_url(pg_url)
        assert password not in (Settings().home / "runner.log").read_text(errors="replace")
        assert all(password not in r.spec_json for r in registry.list())
        # Nor in any process's environment or command line: the service, its executors, the daemons.
        def tree(pid):
            try:
                root = psutil.Process(pid)
                return [root, *root.children(recursive=True)]
            except psutil.Error:  # gone, or a zombie: nothing to read
                return []

        def workers() -> list[int]:  # this cluster's: another test's may run beside it (pytest -n)
            return [p.pid for p in psutil.process_iter(["cmdline"])
                    if "deploy.worker.Worker" in (cmd := " ".join(p.info["cmdline"] or [])) and master in cmd]

        for proc in [*tree(service["pid"]), *(p for pid in workers() for p in tree(pid))]:
            try:
                seen = " ".join(proc.cmdline()) + " ".join(f"{k}={v}" for k, v in proc.environ().items())
            except psutil.Error:
                continue
            assert password not in seen, seen[:200]

        # Scaled back in, no executor outlives its worker: a worker shutting down still launched the
        # executors its master asked for, which then served tasks on a worker that no longer existed.
        # The service's executors, wherever they are: one that outlived its worker is no longer under it.
        app = status["master"]["active_apps"][0]["id"]

        def executors() -> int:
            return sum(1 for p in psutil.process_iter(["cmdline"])
                       if "CoarseGrainedExecutorBackend" in (cmd := " ".join(p.info["cmdline"] or []))
                       and f" {app} " in f"{cmd} ")

        assert executors() == 2
        cli("scale", "1")
        # A stray executor appeared within a second or two of the scale-in: watch a few seconds for one.
        seen = []
        for _ in range(6):
            time.sleep(0.5)
            seen.append(executors())
        assert seen == [1] * 6, seen
        # `up` on a running master keeps its worker: it stopped every one, and the tasks on them.
        assert "1 workers" in cli("up") and executors() == 1

        # A master that restarts takes the service with it: a standalone app never re-registers with a
        # restarted master, so an orphaned service would take runs it can never run (it did, the master back within
        # seconds). Its run in flight fails by name (it read "driver process … exited without reporting an end", once
        # something looked). Frozen, the service cannot miss three checks of the master in a row whatever the
        # machine: the restart falls between two, as on a fast one.
        hold.touch()
        lost = launch("svc_lost", model=fast_model)
        wait_until(lambda: registry.get(lost).rows_done > 0, timeout=120)
        frozen = psutil.Process(service["pid"])
        frozen.suspend()
        try:
            old_master = master_jvm(env["EMBEDDECK_MASTER_PORT"])
            old_master.kill()
            old_master.wait(30)
            cli("up", "--workers", "1", "--no-runner")
        finally:
            frozen.resume()
        wait_until(lambda: not psutil.pid_exists(service["pid"]), timeout=30)
        assert run_service.info() is None
        hold.unlink()
        ended = registry.get(lost)
        assert ended.state == "failed", ended.error
        assert ended.error.startswith(f"Spark master {master} restarted: it no longer lists application app-"), \
            ended.error
        assert "never rejoins a master" in ended.error

        # Up again, a new service with it; `down` cancels the run in flight, which had failed with Spark's
        # "An error occurred while calling z:…collectAndServe." when its service was stopped under it.
        assert "run service up" in cli("up", "--workers", "1")
        hold.touch()
        busy = launch("svc_down", model=fast_model)
        wait_until(lambda: registry.get(busy).rows_done > 0, timeout=120)
        assert registry.get(busy).driver_pid == run_service.info()["pid"]
        assert f"cancelled 1 run(s) of this cluster: {busy}" in cli("down")
        hold.unlink()
        ended = registry.get(busy)
        assert ended.state == "cancelled" and ended.error == "cancelled by request", ended.error
    finally:
        cli("down")
    status = json.loads(cli("status", "--json"))
    assert status["master"]["state"] == "down" and status["runner"] is None
    assert not psutil.pid_exists(service["pid"]) and not psutil.pid_exists(service["pgid"])  # nothing left running
    # Nor on disk: Spark kept the runs' broadcasts (their URLs, password and all) in the scratch of the service and
    # of the workers' executors, which went with them.
    assert files_holding(pg_url, Settings().home) == []
    assert files_holding(pg_url, Path(tempfile.gettempdir()), since, skip=(Settings().home,)) == []


def test_the_run_service_waits_for_its_master_before_it_dials_it():
    """The controller image starts its master and the run service together. Spark's standalone client retries
    a master that was not yet listening only 20 s later, and the e2e's first run waited those 20 s. Now the
    service launches nothing until the master answers, and then registers at the first try."""
    from jobs.core.settings import Settings
    from jobs.spark import run_service

    port = free_port()
    env = dict(os.environ, EMBEDDECK_MASTER_PORT=str(port), EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()))
    master = f"spark://127.0.0.1:{port}"
    log_path = Settings().home / "runner.log"
    log_path.unlink(missing_ok=True)
    starter = subprocess.Popen([sys.executable, "-c", "import sys; from jobs.spark import run_service; "
                                "run_service.start(sys.argv[1])", master], env=env)
    try:
        wait_until(lambda: run_service.starting(master), timeout=60, every=0.02)
        time.sleep(2)  # long enough for a spark-submit to be under way, were one launched
        assert not psutil.Process(starter.pid).children(recursive=True) and not log_path.exists()
        status = subprocess.run([sys.executable, "-m", "cluster", "status"], env=env, capture_output=True,
                                text=True, timeout=60).stdout
        assert "run service: starting (runs launched now wait for it)" in status, status
        subprocess.run([sys.executable, "-m", "cluster", "up", "--workers", "0", "--no-runner"], env=env,
                       check=True, capture_output=True, timeout=180)
        assert starter.wait(120) == 0 and run_service.info() is not None
        assert "Failed to connect to master" not in log_path.read_text()
    finally:
        if starter.poll() is None:  # a failed check: its spark-submit, if any, runs in a session of its own
            for child in psutil.Process(starter.pid).children(recursive=True):
                child.kill()
            starter.kill()
        subprocess.run([sys.executable, "-m", "cluster", "down"], env=env, capture_output=True, timeout=180)


def test_a_master_ui_that_never_listed_the_application_is_not_a_restart(cluster, monkeypatch):
    """Drivers read their master's JSON at EMBEDDECK_MASTER_WEBUI_PORT of its host to tell a restarted master, which
    lists their application no more. Another program may answer there (another master): one that never listed the
    application must not end it, or every run beside such a program would fail at its first check."""
    import http.server
    import json
    import threading

    from jobs.spark import run_service

    asked = []

    class OtherMaster(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            other = {"status": "ALIVE", "activeapps": [{"id": "app-of-another-master"}]}
            answer_json(self, 200, json.dumps(other).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OtherMaster)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("EMBEDDECK_MASTER_WEBUI_PORT", str(server.server_address[1]))
    cluster.up(workers=0)
    try:
        service = run_service.start(cluster.master_url())
        # Its first look, then three of its 2 s checks: each answered by a master that never listed it.
        wait_until(lambda: asked.count("/json/") >= 4 or not psutil.pid_exists(service["pid"]), timeout=60,
                   what="the service's looks at the other UI")
        assert psutil.pid_exists(service["pid"]), "the service took another master's UI for a restart of its own"
        assert run_service.info()["pid"] == service["pid"]
    finally:
        run_service.stop()
        server.shutdown()


def test_a_master_restarted_before_the_watchs_first_tick_is_told_by_its_first_look(monkeypatch):
    """The watch asks the master's JSON once as it starts: a master that listed the application then and lists it no
    more at the first 2 s tick has restarted. Without that first look nothing had been seen listed, and the watch
    went on for as long as the new master answered. What `lost` reads of pyspark's SparkContext is stood in for:
    the master's address, the application's id, and whether it stopped."""
    import http.server
    import json
    import threading
    import types

    from jobs.spark import master_watch

    looks, started = [], []

    class RestartedMaster(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            looks.append(self.path)
            # Restarted half an interval after the watch started: only a look at its start sees the application.
            apps = [{"id": "app-1"}] if time.monotonic() - started[0] < 0.5 else []
            answer_json(self, 200, json.dumps({"status": "ALIVE", "activeapps": apps}).encode())

        def log_message(self, *args):
            pass

    ui = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RestartedMaster)
    threading.Thread(target=ui.serve_forever, daemon=True).start()
    master = socket.create_server(("127.0.0.1", 0))  # the new master's port accepts connections
    monkeypatch.setenv("EMBEDDECK_MASTER_WEBUI_PORT", str(ui.server_address[1]))
    running = types.SimpleNamespace(isStopped=lambda: False)
    sc = types.SimpleNamespace(master=f"spark://127.0.0.1:{master.getsockname()[1]}", applicationId="app-1",
                               _jsc=types.SimpleNamespace(sc=lambda: running))
    found = []
    watch = threading.Thread(target=lambda: found.append(master_watch.lost(sc, every_s=1.0)), daemon=True)
    try:
        started.append(time.monotonic())
        watch.start()
        watch.join(10)
        assert found == [f"Spark master {sc.master} restarted: it no longer lists application app-1"], looks
        assert len(looks) == 2  # the first look, and the first tick's
    finally:
        running.isStopped = lambda: True  # a watch still going ends at its next tick
        ui.shutdown()
        master.close()


def test_runs_launched_and_dispatched_at_once_start_once_and_within_the_cap(tmp_path, fast_model, monkeypatch):
    """The controller image starts the service in the background. A run posted meanwhile once took a
    spark-submit of its own; the service, registered first, then took every core that workers brought, and
    the run waited for cores for ever (an e2e run, 900 s). Now it waits for the service and runs there. Then
    readers that dispatch it at once (the API's settle loop and its requests) start it once: a second one
    used to be refused by the service and give the run a driver of its own besides (seen in the e2e). And a
    burst of launches starts no more runs than EMBEDDECK_MAX_ACTIVE_RUNS: each used to count only the runs
    started before the burst."""
    import json
    import threading

    from jobs import lifecycle
    from jobs.core.spec import RunSpec
    from jobs.spark import run_service
    from jobs.store.registry import WAITING

    env = dict(os.environ, EMBEDDECK_MASTER_PORT=str(free_port()), EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()))

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "cluster", *args], env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, out.stderr
        return out.stdout

    url = f"sqlite:///{tmp_path / 'svc.sqlite'}"
    seed_demo(url, n=60)
    registry = Registry()
    starter = None
    try:
        cli("up", "--workers", "0", "--no-runner")
        master = json.loads(cli("status", "--json"))["master"]["url"]
        starter = subprocess.Popen([sys.executable, "-c", "import sys; from jobs.spark import run_service; "
                                    "run_service.start(sys.argv[1])", master], env=env)
        wait_until(lambda: run_service.starting(master), timeout=60, every=0.02)
        run_id = lifecycle.launch(RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                                          target="starting_emb", model=fast_model, master=master, launched_by="test"),
                                  registry)
        assert registry.get(run_id).phase == WAITING and registry.get(run_id).driver_pid is None
        assert starter.wait(120) == 0 and not run_service.starting(master)
        readers = 8
        barrier, started = threading.Barrier(readers), []

        def reader():
            barrier.wait()
            started.extend(lifecycle.dispatch(Registry()))

        threads = [threading.Thread(target=reader) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert started == [run_id]
        assert registry.get(run_id).driver_pid == run_service.info()["pid"]
        apps = [a["name"] for a in json.loads(cli("status", "--json"))["master"]["active_apps"]]
        assert apps == ["embeddeck-runner"], apps  # no application of the run's own

        monkeypatch.setenv("EMBEDDECK_MAX_ACTIVE_RUNS", "2")  # one slot left beside the run above
        launches = 6
        barrier, burst = threading.Barrier(launches), []

        def launcher(i):  # record(): launch() less its validation, whose time would spread the burst out
            barrier.wait()
            burst.append(lifecycle.record(RunSpec(db_url=url, source="products", id_column="id",
                                                  text_column="description", target=f"burst_{i}_emb",
                                                  model=fast_model, master=master, launched_by="test"), Registry()))

        threads = [threading.Thread(target=launcher, args=(i,)) for i in range(launches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        started_now = [i for i in burst if registry.get(i).phase != WAITING]
        assert len(burst) == launches and len(started_now) == 1, [registry.get(i).phase for i in burst]
        for i in set(burst) - set(started_now):
            lifecycle.cancel(i, registry)
        assert {lifecycle.get(i, registry).state for i in set(burst) - set(started_now)} == {"cancelled"}
        cli("scale", "1")
        for i in (run_id, *started_now):
            done = lifecycle.wait(i, registry, timeout_s=240)
            assert done.state == "succeeded" and done.rows_done == 60, (done.state, done.error)
            assert done.driver_pid == run_service.info()["pid"]  # the service ran it
    finally:
        if starter is not None and starter.poll() is None:
            starter.kill()
        cli("down")


def test_autoscale_endpoint_and_local_loop_take_the_same_step(tmp_path, monkeypatch):
    """GET /autoscale (what KEDA reads on ACA) and the local loop answer alike for the same state: autoscale
    on with nothing to do, the operator's manual count (autoscale off), and a backlog."""
    from fastapi.testclient import TestClient

    from jobs.doors.api import create_app
    from jobs.store import scaling

    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))
    cluster = LocalCluster(master_port=free_port(), webui_port=free_port())
    registry = Registry()
    controller = Controller(cluster, registry)
    token = {"Authorization": "Bearer loop-and-keda"}
    try:
        cluster.up(workers=0)
        with TestClient(create_app("loop-and-keda", registry)) as api:
            def both():
                keda = api.get("/autoscale", headers=token).json()
                loop = controller.tick()
                return keda, loop

            keda, loop = both()
            assert keda["desired"] == loop.desired == 0 and keda["reason"] == loop.reason

            scaling.set_manual(1, registry)  # the operator's count, as the Cluster page and `cluster scale` set it
            keda, loop = both()
            assert keda["desired"] == loop.desired == 1
            assert keda["reason"] == loop.reason == "autoscale off: manual count"
            assert cluster.master_state().alive_workers == 1

            settings = scaling.load_settings(registry)
            settings.autoscale, settings.max_workers = True, 2
            scaling.save_settings(settings, registry)
            registry.create("{}", "test", "products", "t", "m", cluster.master_url())  # a queued run: backlog
            wait_until(lambda: api.get("/autoscale", headers=token).json()["current"] == 1, timeout=30)
            keda, loop = both()
            assert keda["desired"] == loop.desired == 2 and keda["reason"] == loop.reason
            assert loop.reason.startswith("1 run not planned yet")
    finally:
        cluster.down()


INTRUDER = """
import os
from pyspark import SparkContext
sc = SparkContext(appName="intruder")
print("STOLEN", sc.parallelize([0], 1).map(lambda _: dict(os.environ)).collect())
"""


def test_the_master_refuses_an_application_without_the_cluster_secret(cluster, tmp_path, monkeypatch):
    """A 10-line pyspark app submitted by anyone on the machine once ran on our workers and printed the
    database password: the cluster now admits only applications that hold its secret (spark.authenticate,
    traffic encrypted), and no daemon or executor carries EmbedDeck's secrets in its environment."""
    from jobs.spark.jvm import spark_env, spark_submit

    monkeypatch.setenv("EMBEDDECK_DB_URL", "postgresql+psycopg://app:Db5ecret@127.0.0.1:1/prod")
    monkeypatch.setenv("EMBEDDECK_API_TOKEN", "Ap1token-never-shared")
    monkeypatch.setenv("EMBEDDECK_REMOTE_API_KEY", "Rem0te-key")
    cluster.up(workers=1)
    app = tmp_path / "intruder.py"
    app.write_text(INTRUDER)
    env = {k: v for k, v in spark_env().items() if k != "_SPARK_AUTH_SECRET"}  # all an outsider has
    # Its scratch in the test's directory: it is killed below, and would leave its directories in /tmp.
    proc = subprocess.Popen([spark_submit(), "--master", cluster.master_url(), "--driver-java-options",
                             f"-Djava.io.tmpdir={tmp_path}", str(app)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        refused = wait_until(lambda: (out := proc.stdout.readline()) and "SASL" in out and out, timeout=120,
                             every=0)
        assert "Expected SaslMessage" in refused or "SASL" in refused
        assert cluster.master_state().active_apps == []
    finally:
        proc.kill()
        rest = proc.communicate()[0]
    assert "STOLEN" not in rest
    secrets = ("Db5ecret", "Ap1token-never-shared", "Rem0te-key")
    for pid in [*cluster.worker_pids().values(), cluster._load("master").pid]:
        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
            try:
                environ = "\n".join(f"{k}={v}" for k, v in p.environ().items())
                cmdline = " ".join(p.cmdline())
            except psutil.Error:  # an executor that exited with the refused application
                continue
            assert not any(s in environ for s in secrets), cmdline[:200]
            assert not any(s in cmdline for s in secrets)
