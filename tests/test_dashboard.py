"""Every page through Streamlit's AppTest against the real core (embedded SQLite, real Spark runs)."""

import datetime as dt
from pathlib import Path

import pytest
import sqlalchemy as sa
import streamlit as st
from streamlit.testing.v1 import AppTest

from dashboard import charts, views
from jobs.core.settings import Settings
from jobs.store import connections, db
from jobs.store.demo import seed_demo
from jobs.store.registry import Registry
from tests.conftest import arguments_of, run_service_jvms, shown, stopped_while_run_service_starts, wait_until

pytestmark = pytest.mark.spark
ROWS = 200
REPO = Path(__file__).resolve().parent.parent


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module", autouse=True)
def pages_leave_no_settle_loop():
    """The pages start the dashboard's settle loop in this process (services.settling); clearing the cache stops
    it, so that later tests own their waiting runs."""
    yield
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def demo(home):
    seed_demo(Settings().db_url, n=ROWS)
    return Settings().db_url


def test_connections_hide_passwords(monkeypatch):
    monkeypatch.setenv("EMBEDDECK_DB_URL", "postgresql://u:topsecret@h/db")
    conns = connections.configured({"connections": {"prod": {"url": "mssql+pyodbc://sa:hunter2@sql/db"}}})
    labels = [connections.label(n, u) for n, u in conns.items()]
    assert not any("topsecret" in x or "hunter2" in x for x in labels)
    assert connections.resolve("mssql+pyodbc://sa:***@sql/db", conns) == "mssql+pyodbc://sa:hunter2@sql/db"


def test_launch_run_search_flow(demo):
    at = page("launch")
    assert at.selectbox[1].value == "products"
    assert [sb.value for sb in at.selectbox[2:4]] == ["id", "description"]
    assert any(f"{ROWS:,} rows still need a vector" in c.value for c in at.caption)
    assert not at.error and not at.warning
    preview = at.dataframe[0].value  # the first rows as a run will embed them
    assert list(preview.columns) == ["id", "description"] and len(preview) == 5
    assert all(isinstance(t, str) and t.strip() for t in preview["description"])
    at.button[0].click().run()
    assert not at.exception, at.exception
    registry = Registry()
    run = registry.list()[0]
    assert run.launched_by == "dashboard" and run.target == "products_embeddings"

    runs = page("runs")
    assert runs.selectbox[0].value == run.run_id or run.run_id in runs.selectbox[0].options
    wait_until(lambda: not registry.get(run.run_id).active, timeout=240, every=2)
    assert registry.get(run.run_id).state == "succeeded", registry.get(run.run_id).error
    runs = page("runs")
    assert any(run.run_id in s.value for s in runs.subheader)
    assert "succeeded" in runs.subheader[0].value
    assert runs.button[0].label == "Rerun"  # a finished run offers rerun, not cancel
    assert runs.dataframe[0].value["state"].iloc[0] == "succeeded"

    # The model hub's name of the packaged model is the model these rows hold (it had counted every row again).
    again = page("launch")
    again.text_input[1].set_value("sentence-transformers/all-MiniLM-L6-v2").run()
    assert any(c.value.startswith("0 rows still need a vector") for c in again.caption), again.caption

    search = page("search")
    search.text_input[0].input("hiking boots for mountain trails")
    search.button[0].click().run()
    assert not search.exception, search.exception
    table = search.table[0].value
    assert len(table) == 5 and table["score"].is_monotonic_decreasing
    assert table["text"].str.contains("boot|shoe|runner", case=False).any()
    assert any("model all-MiniLM-L6-v2" in shown(c.value) for c in search.caption)


def test_launch_offers_no_table_of_embeddecks_own_as_a_source(tmp_path, monkeypatch):
    """On ACA the registry is the run's SQL database: the Launch page offered its seven tables as sources."""
    from jobs.store import registry, scaling

    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    seed_demo(url, n=5)
    for metadata in (registry.metadata, scaling.metadata, db.targets_table.metadata):
        metadata.create_all(db.engine_for(url))
    monkeypatch.setenv("EMBEDDECK_DB_URL", url)
    at = page("launch")
    at.selectbox[0].select_index(1).run()  # the environment's connection
    assert at.selectbox[1].options == ["products"]


def test_launch_explains_invalid_choices(demo):
    at = page("launch")
    at.text_input[0].set_value("products").run()  # target == source
    assert any("target table must differ" in e.value for e in at.error)
    assert at.button[0].disabled


def test_launch_offers_the_tables_key_first_and_previews_only_rows_with_an_id(demo):
    """The first integer column was the default id even where the key came later; a NULL id among the first
    rows crashed the preview (int(None)); a table keyed by text offered no key at all."""
    engine = db.engine_for(demo)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tickets (queue INTEGER, ticket_no INTEGER PRIMARY KEY, body TEXT)"))
        conn.execute(sa.text("INSERT INTO tickets VALUES (NULL, 1, 'printer jams'), (7, 2, 'vpn drops')"))
        conn.execute(sa.text("CREATE TABLE skus (price REAL, body TEXT, sku VARCHAR(20) PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO skus VALUES (9.5, 'red kayak', 'KY-01')"))
        conn.execute(sa.text("CREATE VIEW sku_labels AS SELECT sku, 'SKU ' || sku || ': ' || body AS label FROM skus"))
    try:
        at = page("launch")
        assert "sku_labels" in at.selectbox[1].options  # a view is a source too
        at.selectbox[1].select("skus").run()
        assert at.selectbox[2].options == ["sku", "body"] and at.selectbox[2].value == "sku"
        assert not at.exception and not at.error and not at.warning, at.exception or at.error or at.warning
        assert at.dataframe[0].value.to_dict("records") == [{"sku": "KY-01", "body": "red kayak"}]
        assert any(c.value.startswith("1 row still needs a vector") for c in at.caption), at.caption
        at.selectbox[1].select("tickets").run()
        assert [sb.value for sb in at.selectbox[2:4]] == ["ticket_no", "body"]
        assert at.selectbox[2].options == ["ticket_no", "queue", "body"]
        assert not at.warning
        at.selectbox[2].select("queue").run()
        assert not at.exception and not at.error, at.exception or at.error
        assert "'queue' is not a key of 'tickets'" in shown(at.warning[0].value)
        assert at.dataframe[0].value.to_dict("records") == [{"queue": 7, "body": "vpn drops"}]
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE tickets"))
            conn.execute(sa.text("DROP VIEW sku_labels"))
            conn.execute(sa.text("DROP TABLE skus"))


def test_cancel_click_returns_at_once_and_the_run_settles(demo, fast_model, hold_file):
    """The Runs page asks for the cancel and returns (well under a second); the live view then shows the
    run cancelled once its driver has stopped its Spark jobs. The hold file keeps the run in flight."""
    import time

    from jobs import lifecycle
    from jobs.core.spec import RunSpec

    registry = Registry()
    spec = RunSpec(db_url=demo, source="products", id_column="id", text_column="description",
                   target="cancel_click_emb", model=fast_model, master="local[2]", launched_by="test")
    run_id = lifecycle.launch(spec, registry)
    wait_until(lambda: registry.get(run_id).rows_done > 0, timeout=180)
    at = page("runs")
    at.selectbox[0].select(run_id).run()
    # A run in flight: both live views tick at their live pace (2 s and 3 s), and at the idle one once it ends.
    assert at.session_state["runs_every_s"] == 2.0
    assert page("cluster").session_state["cluster_every_s"] == 3.0
    cancel = next(b for b in at.button if b.label == "Cancel run")
    t0 = time.perf_counter()
    cancel.click().run()
    assert time.perf_counter() - t0 < 1.0
    assert not at.exception, at.exception
    assert registry.get(run_id).cancel_requested
    final = lifecycle.wait(run_id, registry, timeout_s=60)
    assert final.state == "cancelled" and 0 < final.rows_done < ROWS
    assert page("runs").session_state["runs_every_s"] == page("cluster").session_state["cluster_every_s"] == 15.0


@pytest.mark.parametrize("name", [None, "launch", "runs", "cluster", "search"])
def test_proxy_mode_shows_nothing_without_the_user_header(monkeypatch, name):
    """The entry page and each page opened directly (AppTest runs a page's file on its own, as a fresh server does
    for its first request to /cluster)."""
    monkeypatch.setenv("EMBEDDECK_DASHBOARD_AUTH", "proxy")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    (at.switch_page(f"pages/{name}.py") if name else at).run()
    assert any("Sign-in required" in e.value for e in at.error)
    assert not at.title and not at.metric and not at.selectbox


def test_cluster_page_with_master_down():
    at = page("cluster")
    assert any("Spark master is down" in w.value for w in at.warning)
    assert at.metric[0].value == "down"
    assert at.session_state["cluster_every_s"] == 15.0  # nothing moves: the idle pace


def test_start_master_on_the_cluster_page_starts_its_run_service_and_stop_stops_both(tmp_path, monkeypatch):
    """Start master started the master alone: the next runs (whose default master is the run service's) went to
    local[*], off the cluster, while the autoscaler started workers for them that idled. Stop cluster left the run
    service to notice its master had gone."""
    from cluster.local import LocalCluster
    from jobs import lifecycle
    from jobs.core.processes import free_port
    from jobs.spark import run_service

    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDDECK_MASTER_PORT", str(free_port()))
    monkeypatch.setenv("EMBEDDECK_MASTER_WEBUI_PORT", str(free_port()))
    st.cache_resource.clear()  # the page's backend and registry: this home's
    cluster = LocalCluster()
    try:
        at = page("cluster")
        next(b for b in at.button if b.label == "Start master").click().run(timeout=180)
        assert not at.exception, at.exception
        service = run_service.info()
        assert cluster.master_state().reachable and service is not None
        assert lifecycle.resolve_master() == service["master"] == cluster.master_url()
        next(b for b in at.button if b.label.startswith("Stop cluster")).click().run(timeout=120)
        assert not at.exception, at.exception
        assert not cluster.master_alive() and run_service.info() is None
        assert lifecycle.resolve_master() == "local[*]"
    finally:
        run_service.stop()
        cluster.down()
        st.cache_resource.clear()


def test_a_run_on_a_cluster_without_workers_says_why_it_waits_and_goes_on_when_one_joins(tmp_path, monkeypatch,
                                                                                        fast_model):
    """A run on a master with no worker showed "planning: 0 / 0 rows" (or rows/s 0 and ETA "—") and nothing else.
    The Runs page now says the cluster has no alive worker and what would start one; the run finishes once a
    worker joins."""
    from cluster import backends
    from cluster.local import LocalCluster
    from jobs import lifecycle
    from jobs.core.autoscale import ScalingSettings
    from jobs.core.processes import free_port
    from jobs.core.spec import RunSpec
    from jobs.store import scaling

    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDDECK_MASTER_PORT", str(free_port()))
    monkeypatch.setenv("EMBEDDECK_MASTER_WEBUI_PORT", str(free_port()))
    st.cache_resource.clear()  # the page's backend and registry: this home's
    url = f"sqlite:///{tmp_path / 'waits.sqlite'}"
    seed_demo(url, n=60)
    cluster = LocalCluster()
    registry = Registry()
    try:
        cluster.up(workers=0)
        scaling.set_manual(0, registry)
        run_id = lifecycle.launch(RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                                          target="waits_emb", model=fast_model, master=cluster.master_url(),
                                          launched_by="test"), registry)
        wait_until(lambda: registry.get(run_id).phase == "planning", timeout=120, what="the run's driver")
        at = page("runs")
        at.selectbox[0].select(run_id).run()
        warnings = [shown(w.value) for w in at.warning]
        assert any("no alive worker" in w and "manual at 0 workers" in w for w in warnings), warnings
        scaling.save_settings(ScalingSettings(autoscale=True, max_workers=2), registry)
        at.run()
        assert any("autoscaler starts workers for it (at most 2)" in shown(w.value) for w in at.warning)
        cluster.scale(1)
        assert lifecycle.wait(run_id, registry, timeout_s=180).state == "succeeded"
        at.run()
        assert not any("no alive worker" in shown(w.value) for w in at.warning)
    finally:
        # As the page's Stop: the run is cancelled first. A failed assertion left it planning, and its own driver,
        # its master stopped under it, then waited for that master indefinitely.
        backends.stop_all(cluster, registry)
        st.cache_resource.clear()


def test_run_views_are_pure():
    import dataclasses

    from jobs.store.registry import Run

    run = Run(run_id="r-1", state="running", cancel_requested=False, spec_json="{}", launched_by="api",
              source="s", target="t", model="m", master="local[2]", created_at=db.utcnow(), started_at=db.utcnow(),
              ended_at=None, heartbeat_at=None, rows_total=1000, rows_done=250, rows_skipped=7, rows_per_s=50.0,
              phase="embedding", error=None, driver_pid=None, driver_host=None, driver_started=None, log_path=None,
              ui_url=None)
    frac, caption = views.run_progress(run)
    assert frac == 0.25 and "ETA 15s" in caption and "7 skipped" in caption and "removed" not in caption
    assert views.run_progress(dataclasses.replace(run, rows_removed=3))[1].endswith("7 skipped · 3 vectors removed")
    assert views.run_row(run)["source → target"] == "s → t"
    from jobs.embed.search import Hit

    long, short = "word " * 13_000, "*a* $5 and $6"  # a text cut to what a run embeds holds 65,536 characters
    rows = views.hit_rows([Hit(7, 0.91234, long), Hit("k_1", 0.5, short), Hit(9, 0.1, None)])
    assert rows[0]["text"] == long[:views.SHOWN_TEXT_CHARS] + " …" and rows[0]["score"] == 0.9123
    assert [shown(rows[1]["text"]), shown(rows[1]["id"]), rows[2]["text"]] == [short, "k_1", None]

    service, own = "http://127.0.0.1:4040", "http://127.0.0.1:4041"
    runs = [dataclasses.replace(run, run_id="r-a", ui_url=service), dataclasses.replace(run, run_id="r-b", ui_url=own),
            dataclasses.replace(run, run_id="r-c", ui_url=service),
            dataclasses.replace(run, run_id="r-done", ui_url=service, state="succeeded")]
    assert views.runs_by_app(runs) == {service: ["r-a", "r-c"], own: ["r-b"]}

    from cluster.spark_rest import MasterState
    from jobs.core.autoscale import ScalingSettings

    empty = MasterState(reachable=True, status="ALIVE")
    one = dataclasses.replace(empty, alive_workers=1)
    manual = ScalingSettings(autoscale=False, desired=2)
    assert "manual at 2 workers, none alive yet" in views.waiting_for_workers(run, empty, manual, "1g")
    assert "its maximum is 0" in views.waiting_for_workers(run, empty, ScalingSettings(max_workers=0), "1g")
    assert views.waiting_for_workers(run, one, manual, "1g") is None
    # Workers alive, and none of them gives the run's application an executor: their cores are held by another
    # application, or the one with a free core has too little memory free for an executor.
    from cluster.spark_rest import WorkerInfo

    starved = dataclasses.replace(run, executors=0)
    busy = WorkerInfo("w-0", "h", 1, "ALIVE", cores=1, cores_used=1, memory_mb=2048, memory_used_mb=1024, webui="")
    small = dataclasses.replace(busy, id="w-1", cores_used=0, memory_used_mb=0)
    held = dataclasses.replace(one, workers=[busy, dataclasses.replace(small, state="DEAD")])
    assert "1 alive worker are all held by other applications" in views.waiting_for_workers(starved, held, manual, "1g")
    two = dataclasses.replace(one, alive_workers=2, workers=[busy, small])
    assert "less memory free than an executor asks (EMBEDDECK_EXECUTOR_MEMORY=4g)" in \
        views.waiting_for_workers(starved, two, manual, "4g")
    assert "Spark offers them within seconds" in views.waiting_for_workers(starved, two, manual, "2g")
    assert views.waiting_for_workers(dataclasses.replace(run, executors=1), held, manual, "1g") is None
    down = MasterState(reachable=False)
    assert views.waiting_for_workers(run, down, manual, "1g") is None  # the page says it is down
    assert views.waiting_for_workers(dataclasses.replace(run, state="queued", phase="planning"), empty, manual, "1g")
    waiting = dataclasses.replace(run, state="queued", phase="waiting")
    assert views.waiting_for_workers(waiting, empty, manual, "1g") is None
    assert views.waiting_for_workers(dataclasses.replace(run, state="succeeded"), empty, manual, "1g") is None


def test_gpu_columns_show_only_where_a_worker_has_a_gpu():
    from jobs.store.worker_readings import GpuReading, Reading

    cpu = Reading(worker="worker-0", host="h", at=0.0, cpu_pct=45.83, memory_mb=651.2)
    h200 = GpuReading(0, "NVIDIA H200", 91.0, 2048.0, 143771.0, 54.0, 410.5)
    gpu = Reading(worker="gpu-0", host="h", at=0.0, gpus=[h200])
    assert views.telemetry_rows([cpu]) == [{"worker": "worker-0", "kind": "CPU (no GPU on this worker)",
                                            "utilisation %": 45.8, "memory MB": "651 PSS", "stale": False,
                                            "source": "worker"}]
    mixed = views.telemetry_rows([gpu, cpu])
    assert [list(row) for row in mixed] == [["worker", "kind", "utilisation %", "memory MB", "temp °C", "power W",
                                             "stale", "source"]] * 2
    assert (mixed[0]["temp °C"], mixed[0]["power W"], mixed[1]["temp °C"]) == (54.0, 410.5, None)


def test_unreachable_database_is_a_clear_state(monkeypatch):
    monkeypatch.setenv("EMBEDDECK_DB_URL", "postgresql+psycopg://u:Sekr1t@127.0.0.1:1/db")
    for name in ("launch", "search"):
        at = page(name)
        at.selectbox[0].select_index(1).run()
        assert not at.exception, at.exception
        assert "cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/db" in shown(at.error[0].value)
        assert "Sekr1t" not in str([shown(e.value) for e in at.error])


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_make_run_entry_point_starts_and_stops_everything(tmp_path, stop):
    """`python -m dashboard` (what `make run` calls): demo data, master, autoscaler, Streamlit; SIGTERM (a service
    manager) and SIGHUP (its terminal closed: the cluster's daemons, in sessions of their own, lived on) clean up,
    also where its output has gone (Streamlit, printing as it stops, then never stopped, and the cluster ran on).
    Started twice at once, one runs and the other starts and stops nothing: both had found the port free and the
    master down, and the one whose Streamlit lost the port stopped the cluster the other went on showing."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import psutil
    import requests

    from cluster.local import LocalCluster
    from jobs.core.processes import free_port, is_alive, read_json

    ports = {"EMBEDDECK_DASHBOARD_PORT": free_port(), "EMBEDDECK_MASTER_PORT": free_port(),
             "EMBEDDECK_MASTER_WEBUI_PORT": free_port()}
    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), **{k: str(v) for k, v in ports.items()})
    procs = [subprocess.Popen([sys.executable, "-m", "dashboard"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    url = f"http://127.0.0.1:{ports['EMBEDDECK_DASHBOARD_PORT']}/_stcore/health"
    try:
        second = wait_until(lambda: next((p for p in procs if p.poll() is not None), None), timeout=120,
                            what="one of two make run to end")
    except AssertionError:
        for p in procs:
            p.terminate()
        raise
    proc = next(p for p in procs if p is not second)

    def healthy():
        try:
            return requests.get(url, timeout=1).ok
        except requests.RequestException:
            return False

    try:
        told = second.communicate()[0]
        assert second.returncode == 2 and told.strip().endswith(
            f"error: another `make run` is running with this EMBEDDECK_HOME ({tmp_path}); nothing was started or "
            "stopped"), told
        wait_until(healthy, timeout=120, every=1)
        cluster = LocalCluster(home=tmp_path, master_port=ports["EMBEDDECK_MASTER_PORT"],
                               webui_port=ports["EMBEDDECK_MASTER_WEBUI_PORT"])
        assert cluster.master_state().status == "ALIVE"
        service = json.loads((tmp_path / "runner.json").read_text())  # the warm run service is up
        assert [a["name"] for a in cluster.master_state().active_apps] == ["embeddeck-runner"]
        assert db.engine_for(f"sqlite:///{tmp_path / 'embeddeck.sqlite'}").connect().execute(
            db.sa.text("SELECT count(*) FROM products")).scalar() == 6000
        if stop == "SIGTERM":  # once: what it started is started again when it dies (it ran on without them)
            def autoscaler():
                return next((c for c in psutil.Process(proc.pid).children() if "autoscale" in arguments_of(c)), None)

            def new_service():
                data = read_json(tmp_path / "runner.json") or {}  # none while the new one starts
                return data if data.get("pid") not in (None, service["pid"]) and is_alive(
                    data["pid"], data["pid_started"]) else None

            killed = autoscaler()
            os.kill(service["pid"], signal.SIGKILL)
            killed.kill()
            service = wait_until(new_service, timeout=120, what="a new run service")
            wait_until(lambda: autoscaler() and autoscaler().pid != killed.pid, timeout=30, what="a new autoscaler")
            assert [a["name"] for a in cluster.master_state().active_apps] == ["embeddeck-runner"]
        if stop == "SIGHUP":  # its terminal is gone: what it and its children print next goes nowhere
            out = ""
            while "run service up" not in out and (line := proc.stdout.readline()):
                out += line
            proc.stdout.close()
    finally:
        proc.send_signal(getattr(signal, stop))
        if stop == "SIGHUP":
            proc.wait(timeout=60)
        else:
            out, _ = proc.communicate(timeout=60)
    assert "demo data: 6000 rows" in out
    assert not cluster.master_alive() and not healthy()
    left = []  # the run service's processes still running; a zombie runs nothing (init reaps it in a moment)
    for pid in {service["pid"], service["pgid"]}:
        try:
            info = psutil.Process(pid).as_dict(["pid", "ppid", "status", "cmdline"])
        except psutil.NoSuchProcess:
            continue
        if info["status"] != psutil.STATUS_ZOMBIE:
            left.append(info)
    assert not left, (left, out[-3000:])
    assert not (tmp_path / "runner.json").exists()


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_make_run_stopped_while_its_cluster_starts_stops_that_cluster(tmp_path, stop):
    """Stopped in its first seconds, while its master and run service started, `make run` ended in a traceback
    (Ctrl-C) or with no word (SIGTERM), and left both running: the next `make run` took that cluster for one started
    by hand, and left it running when it stopped."""
    import os

    from cluster.local import LocalCluster
    from jobs.core.processes import free_port

    ports = {"EMBEDDECK_DASHBOARD_PORT": free_port(), "EMBEDDECK_MASTER_PORT": free_port(),
             "EMBEDDECK_MASTER_WEBUI_PORT": free_port()}
    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), **{k: str(v) for k, v in ports.items()})
    status, out = stopped_while_run_service_starts(["dashboard"], env, tmp_path, stop)
    assert status == 0 and "Traceback" not in out, out
    cluster = LocalCluster(home=tmp_path, master_port=ports["EMBEDDECK_MASTER_PORT"],
                           webui_port=ports["EMBEDDECK_MASTER_WEBUI_PORT"])
    assert not cluster.master_alive() and not cluster.workers()
    wait_until(lambda: not run_service_jvms(tmp_path), timeout=15, what="the run service's end")


def test_make_run_on_the_aca_backend_refuses_before_it_starts_anything(tmp_path):
    """`make run` with EMBEDDECK_CLUSTER_BACKEND=aca tried to start Container Apps' master, then to stop it, and
    ended in a traceback (BadRequest from the ACA backend's down)."""
    import os
    import subprocess
    import sys

    from jobs.core.processes import free_port

    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_DASHBOARD_PORT=str(free_port()),
               EMBEDDECK_CLUSTER_BACKEND="aca", AZURE_SUBSCRIPTION_ID="00000000-0000-0000-0000-000000000000",
               AZURE_RESOURCE_GROUP="rg", AZURE_LOCATION="westeurope")
    out = subprocess.run([sys.executable, "-m", "dashboard"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "make run starts a local cluster, and EMBEDDECK_CLUSTER_BACKEND is 'aca'" in out.stderr
    assert not (tmp_path / "embeddeck.sqlite").exists() and not (tmp_path / "cluster").exists()


@pytest.mark.parametrize("variable", ["EMBEDDECK_DB_URL", "EMBEDDECK_REGISTRY_URL"])
def test_make_run_names_a_database_or_registry_it_cannot_use_before_it_starts_anything(tmp_path, variable):
    """`make run` over a file that is not a database (or a server that does not answer) ended in SQLAlchemy's
    traceback from the demo seed; over such a registry it started the master, failed to start the run service, and
    ended in a traceback from stopping the cluster, its master left running."""
    import os
    import subprocess
    import sys

    import psutil

    from jobs.core.processes import free_port

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database\n" * 100)
    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_DASHBOARD_PORT=str(free_port()),
               EMBEDDECK_MASTER_PORT=str(free_port()), EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()),
               **{variable: f"sqlite:///{garbage}"})
    out = subprocess.run([sys.executable, "-m", "dashboard"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    named = "" if variable == "EMBEDDECK_DB_URL" else "the run registry (EMBEDDECK_REGISTRY_URL): "
    assert f"error: {named}cannot connect to sqlite:///{garbage}: file is not a database; nothing was started" \
        in out.stderr
    assert "Spark master" not in out.stdout and garbage.read_bytes() == b"not a database\n" * 100
    assert not [p for p in psutil.process_iter(["cmdline"]) if env["EMBEDDECK_MASTER_PORT"] in
                " ".join(p.info["cmdline"] or [])]


@pytest.mark.parametrize("module", ["dashboard", "dashboard.server"])
def test_make_run_and_the_server_refuse_numbers_set_wrong_before_they_start_anything(tmp_path, module):
    """EMBEDDECK_DASHBOARD_PORT=abc ended `make run` in a ValueError traceback, and a price or worker limit that is
    no number reached the browser as a traceback on the Cluster page."""
    import os
    import subprocess
    import sys

    from jobs.core.processes import free_port

    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_DASHBOARD_PORT="abc",
               EMBEDDECK_PRICE_PER_UNIT_S="0,0004", EMBEDDECK_MAX_WORKERS="4.5")
    out = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: ")
    for problem in ("EMBEDDECK_DASHBOARD_PORT must be an integer from 1 to 65535, not 'abc'",
                    "EMBEDDECK_PRICE_PER_UNIT_S must be a number of at least 0, not '0,0004'",
                    "EMBEDDECK_MAX_WORKERS must be an integer of at least 0, not '4.5'"):
        assert problem in out.stderr
    assert not (tmp_path / "embeddeck.sqlite").exists() and not (tmp_path / "cluster").exists()
    env.update(EMBEDDECK_DASHBOARD_PORT=str(free_port()), EMBEDDECK_PRICE_PER_UNIT_S="", EMBEDDECK_MAX_WORKERS="",
               EMBEDDECK_CLUSTER_BACKEND="kubernetes")  # every page reads the backend too
    out = subprocess.run([sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "EMBEDDECK_CLUSTER_BACKEND must be local or aca, not 'kubernetes'" in out.stderr


def test_the_workers_line_breaks_where_the_controller_was_not_sampling():
    """Drawn through, a cluster stopped overnight at 2 workers and started again at 0 showed 2 workers all night."""
    t0 = dt.datetime(2026, 11, 29, 6, 0)
    samples = [{"at": t0 + dt.timedelta(seconds=s), "workers": w, "desired": w}
               for s, w in [(0, 2), (5, 2), (86_400, 0), (86_405, 2)]]
    workers, desired = charts.workers_figure(samples, []).data
    assert list(workers.y) == list(desired.y) == [2, 2, None, 0, 2]
    assert workers.x[2] == workers.x[1]  # the break sits at the last sample before the silence


def test_time_axes_span_minutes_however_few_the_points():
    """Fitted to one decision, Plotly spread the workers' axis over a fraction of a millisecond (17:44:31.9782,
    .9783, ...); with nothing yet, it was a numeric axis from -1 to 6."""
    t0 = dt.datetime(2026, 12, 1, 17, 44, 31, 978_200)
    event = {"at": t0, "from_workers": 0, "to_workers": 0, "source": "autoscaler", "reason": "hold: no backlog"}
    low, high = charts.workers_figure([], [event]).layout.xaxis.range
    assert high - low >= dt.timedelta(seconds=charts.WORKERS_SPAN_S) and low < t0 < high
    low, high = charts.workers_figure([], [], now=t0).layout.xaxis.range
    assert low < t0 < high and high - low >= dt.timedelta(minutes=10)
    hour = [{"at": t0 + dt.timedelta(minutes=m), "workers": 1, "desired": 1} for m in (0, 60)]
    assert charts.workers_figure(hour, [], now=t0).layout.xaxis.range is None  # Plotly fits an hour itself
    low, high = charts.throughput_figure([(t0, 10, 5.0), (t0 + dt.timedelta(seconds=2), 20, 5.0)]).layout.xaxis.range
    assert high - low >= dt.timedelta(seconds=charts.THROUGHPUT_SPAN_S)


def test_the_server_settings_are_the_products_as_streamlit_reads_them(monkeypatch):
    """.streamlit/config.toml, parsed by Streamlit from the checkout as `make run` starts it: no file watcher and no
    full garbage collection per rerun (each took about half of the server's CPU on an idle Cluster page)."""
    from streamlit import config

    monkeypatch.chdir(REPO)
    for name in ("STREAMLIT_SERVER_FILE_WATCHER_TYPE", "STREAMLIT_RUNNER_POST_SCRIPT_GC",
                 "STREAMLIT_CLIENT_TOOLBAR_MODE"):
        monkeypatch.delenv(name, raising=False)
    try:
        config.get_config_options(force_reparse=True)
        assert config.get_option("server.fileWatcherType") == "none"
        assert config.get_option("runner.postScriptGC") is False
        assert config.get_option("client.toolbarMode") == "viewer"
    finally:
        monkeypatch.undo()
        config.get_config_options(force_reparse=True)
