"""Runs as operators start them: `python -m jobs` → spark-submit driver process → registry."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from jobs.core.processes import FREE_PORT_FLOOR, free_port, port_taken, ports_below
from jobs.core.settings import REPO
from jobs.store import db
from jobs.store.demo import seed_demo
from jobs.store.registry import Registry
from tests import postgres
from tests.conftest import check_table, files_holding, wait_until

pytestmark = pytest.mark.spark
ROWS = 500


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "jobs", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def status(run_id):
    """What `status --json` prints, read in-process (polling with a CLI process a second would eat a core)."""
    registry = Registry()
    registry.reconcile()
    return registry.get(run_id).as_dict()


def cli_status(run_id):
    out = cli("status", run_id, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_status(run_id, predicate, timeout):
    """Poll `status --json` until predicate(status) holds; returns that status."""
    found = {}

    def check():
        found.update(status(run_id))
        if predicate(found):
            return True
        assert not ended(found), f"run ended {found['state']} before the awaited state: {found['error']}"
        return False

    wait_until(check, timeout=timeout, every=1.0)
    return dict(found)


def ended(s):
    return s["state"] not in ("queued", "running")


def run_args(url, target="products_emb", *extra):
    return ["run", "--db", url, "--source", "products", "--id-column", "id", "--text-column",
            "description", "--target", target, *extra]


@pytest.fixture
def demo_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    seed_demo(url, n=ROWS)
    return url


def test_detached_run_reports_progress_and_succeeds(demo_url, reference_model, hold_file):
    """The real model end to end through spark-submit; the hold file keeps the run in flight after its first
    commits, so its progress is seen however fast the machine encodes."""
    out = cli(*run_args(demo_url, "products_emb", "--master", "local[2]", "--detach"))
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    assert run_id.startswith("r-")
    seen = wait_status(run_id, lambda s: s["state"] == "running" and s["rows_done"] > 0, 180)
    assert seen["rows_total"] == ROWS and 0 < seen["rows_done"] < ROWS
    hold_file.unlink()
    wait_status(run_id, ended, 300)
    final = cli_status(run_id)
    assert final["state"] == "succeeded", final["error"]
    assert final["rows_done"] == ROWS and final["launched_by"] == "cli"
    listed = json.loads(cli("list", "--json").stdout)
    assert run_id in [r["run_id"] for r in listed]
    check_table(demo_url, reference_model, ROWS, "products_emb")
    # The driver imported the installed pyspark, compiled once, not Spark's zip, compiled from source at each start.
    assert "pyspark imports from" in open(final["log_path"]).read()


# The next two act on a run in flight: the hold file keeps it there after its first commits, and the
# tiny model encodes far faster than any real machine, so neither depends on how fast this CPU is.

def test_driver_killed_midway_then_rerun_completes(demo_url, fast_model, fast_reference, hold_file, home, tmp_path):
    """The killed driver's Spark scratch, which holds the run's broadcast database URL, was in EmbedDeck's home,
    not in /tmp, and is gone once the run is seen failed; the rerun embeds every row exactly once."""
    since = time.time() - 1
    run_id = cli(*run_args(demo_url, "killed_emb", "--master", "local[2]", "--model", fast_model,
                           "--detach")).stdout.strip()
    held = wait_status(run_id, lambda s: s["rows_done"] > 0, 180)
    assert held["state"] == "running" and held["rows_done"] < ROWS
    scratch = home / "tmp" / f"run-{run_id}"
    assert files_holding(demo_url, scratch), "the run's broadcast is not in its driver's scratch"
    os.killpg(held["driver_pid"], signal.SIGKILL)
    wait_status(run_id, lambda s: s["state"] == "failed", 30)
    failed = cli_status(run_id)
    assert "exited without reporting" in failed["error"]
    assert not scratch.exists()
    assert files_holding(demo_url, Path(tempfile.gettempdir()), since, skip=(home, tmp_path)) == []
    hold_file.unlink()
    rerun = cli(*run_args(demo_url, "killed_emb", "--master", "local[2]", "--model", fast_model))  # blocking mode
    assert rerun.returncode == 0, rerun.stderr
    assert " succeeded " in rerun.stdout
    check_table(demo_url, fast_reference, ROWS, target="killed_emb", model=fast_model)


def test_cancel_marks_run_cancelled(demo_url, fast_model, hold_file):
    run_id = cli(*run_args(demo_url, "cancel_emb", "--master", "local[2]", "--model", fast_model,
                           "--detach")).stdout.strip()
    wait_status(run_id, lambda s: s["rows_done"] > 0, 180)
    out = cli("cancel", run_id)
    assert out.returncode == 0 and out.stdout.strip() == "cancelled"
    final = status(run_id)
    assert final["state"] == "cancelled" and 0 < final["rows_done"] < ROWS


@pytest.mark.parametrize("change,message", [
    ("ALTER TABLE products RENAME COLUMN description TO descr",
     "text column 'description' is not in table 'products' (columns: id, title, category, price, descr)"),
    ("DROP TABLE changed_emb", "target table 'changed_emb' does not exist"),
])
def test_tables_changed_under_a_run_fail_it_naming_the_change(demo_url, fast_model, hold_file, change, message):
    """A task's next read or write failed with the database's own words ("no such column: products.description"),
    which Spark would retry on a cluster; a dropped target ended the run in the error of its final count."""
    run_id = cli(*run_args(demo_url, "changed_emb", "--master", "local[1]", "--model", fast_model,
                           "--detach")).stdout.strip()
    wait_status(run_id, lambda s: s["rows_done"] > 0, 180)
    with db.engine_for(demo_url).begin() as conn:
        conn.execute(sa.text(change))
    hold_file.unlink()
    final = wait_status(run_id, ended, 120)
    assert final["state"] == "failed" and final["rows_done"] > 0
    assert final["error"] == f"{message} (it changed while the run was in flight; a rerun embeds only what is missing)"


@pytest.mark.parametrize("stops", [["SIGINT"], ["SIGTERM"], ["SIGINT", "SIGINT", "SIGTERM"]],
                         ids=["SIGINT", "SIGTERM", "more-while-it-cancels"])
def test_a_blocking_run_stopped_by_a_signal_is_cancelled(demo_url, fast_model, hold_file, stops):
    """Ctrl-C on a blocking `run` cancels it (exit 3). SIGTERM (a scheduler's timeout) ended the CLI alone: it exited
    with no word, and its run, in a session of its own, went on unwatched to the end. A second Ctrl-C (or SIGTERM)
    while the first one's cancel was under way raised KeyboardInterrupt out of the wait: a traceback, exit -2, the
    run's end unreported; it is told that the cancel is under way now, and waits."""
    target = f"signal_{'_'.join(stops).lower()}_emb"
    proc = subprocess.Popen([sys.executable, "-m", "jobs", *run_args(demo_url, target, "--master", "local[1]",
                                                                       "--model", fast_model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_id = wait_until(lambda: next((r.run_id for r in Registry().list() if r.target == target
                                          and r.rows_done > 0), None), timeout=180, what="the run's first commit")
        proc.send_signal(getattr(signal, stops[0]))
        if stops[1:]:
            # Seen within 20 ms of its writing, the CLI is then in the first of its half-second waits for the run's
            # end, however fast the machine cancels: the next stops land while it cancels.
            registry = Registry()
            wait_until(lambda: registry.get(run_id).cancel_requested, timeout=30, every=0.02,
                       what="the cancel request")
        for stop in stops[1:]:
            proc.send_signal(getattr(signal, stop))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3 and "Traceback" not in err, err
    assert ("already cancelling" in err) == bool(stops[1:]), err
    final = status(run_id)
    assert final["state"] == "cancelled" and 0 < final["rows_done"] < ROWS, final
    assert f"{run_id} cancelled" in out


@pytest.mark.parametrize("extra,message", [
    (["--master", "spark://127.0.0.1:1"], "Spark master spark://127.0.0.1:1 is unreachable"),
    (["--text-column", "nope"], "text column 'nope' is not in table 'products'"),
    (["--model", "/no/such/model"], "is neither all-MiniLM-L6-v2 nor a local sentence-transformers"),
    # These three started a driver that died at once ("killed or crashed"), or raised a traceback.
    (["--master", "local[0]"], "master must be local[N] (N 1 or more, or *) or spark://host:port, not 'local[0]'"),
    (["--master", "localhost"], "not 'localhost'"),
    (["--master", "spark://127.0.0.1:99999"], "a host and a port from 1 to 65535, nothing else"),
])
def test_bad_input_is_one_clear_line(demo_url, extra, message):
    before = len(Registry().list())
    args = run_args(demo_url)
    if "--text-column" in extra:
        args[args.index("--text-column") + 1] = extra[1]
        extra = []
    out = cli(*args, *extra)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: ") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert len(Registry().list()) == before  # nothing recorded


def test_a_deep_home_whose_path_has_a_space_runs_locally_and_on_the_cluster_s_run_service(tmp_path, demo_url,
                                                                                           fast_model):
    """Spark splits its JVM options as a shell does: a scratch under a home with a space, unquoted, was two options,
    and the JVM took the second for its main class ("Could not find or load main class with"): every run's driver
    died at once, and `make run` ended in "Spark master exited at start". And a home deeper than about 95 bytes made
    the run service's socket too long for an address ("AF_UNIX path too long"): the service died at its start, and
    `cluster up` with it."""
    home = tmp_path / f"home with space ü {'x' * 60}"
    assert len(os.fsencode(str(home / "runner.sock"))) > 107
    env = dict(os.environ, EMBEDDECK_HOME=str(home), EMBEDDECK_MASTER_PORT=str(free_port()),
               EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()))

    def call(module, *args):
        out = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    assert " succeeded " in call("jobs", *run_args(demo_url, "spaced_emb", "--master", "local[1]", "--model",
                                                   fast_model))
    try:
        assert "run service up" in call("cluster", "up", "--workers", "1")
        master = f"spark://127.0.0.1:{env['EMBEDDECK_MASTER_PORT']}"
        assert " succeeded " in call("jobs", *run_args(demo_url, "spaced_emb", "--master", master, "--model",
                                                       fast_model, "--mode", "full"))
        ran = json.loads(call("jobs", "list", "--json"))[0]
        assert ran["log_path"] == str(home / "runner.log")  # handed to the run service, not an application of its own
    finally:
        call("cluster", "down")


def test_a_mistyped_sqlite_path_is_named_and_nothing_is_created(tmp_path):
    """Connecting created the file and its folders, and the run then said the source table did not exist."""
    missing = tmp_path / "typo" / "demo.sqlite"
    for args in (run_args(f"sqlite:///{missing}"), ["search", "--db", f"sqlite:///{missing}", "--target", "t", "x"]):
        out = cli(*args)
        assert out.returncode == 2 and out.stderr.strip() == f"error: database file {missing} does not exist"
    assert not missing.parent.exists()


def test_a_relative_sqlite_path_names_the_same_file_in_the_run_s_driver(tmp_path, fast_model):
    """A run's driver works in a folder of its own: `sqlite:///demo.sqlite` typed beside the file named no file
    there, and the run failed ("source table … does not exist", then "database file demo.sqlite does not exist")."""
    seed_demo(f"sqlite:///{tmp_path / 'demo.sqlite'}", n=20)
    out = subprocess.run([sys.executable, "-m", "jobs", *run_args("sqlite:///demo.sqlite", "rel_emb", "--master",
                                                                  "local[1]", "--model", fast_model)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr
    with db.engine_for(f"sqlite:///{tmp_path / 'demo.sqlite'}").connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM rel_emb")).scalar() == 20
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith("demo.sqlite")]  # nothing made beside it


def test_a_relative_model_directory_is_loaded_in_the_run_s_driver_and_recorded_as_one_model(tmp_path, fast_model):
    """`--model models/tiny` validated beside the folder, then the run's driver, which works in a folder of its own,
    found no model there; and each spelling of one directory would have been another model to the target."""
    shutil.copytree(fast_model, tmp_path / "models" / "tiny")
    seed_demo(f"sqlite:///{tmp_path / 'demo.sqlite'}", n=20)

    def cli_here(*args):
        return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))

    out = cli_here(*run_args("sqlite:///demo.sqlite", "tiny_emb", "--master", "local[1]", "--model", "models/tiny"))
    assert out.returncode == 0, out.stdout + out.stderr
    with db.engine_for(f"sqlite:///{tmp_path / 'demo.sqlite'}").connect() as conn:
        models = conn.execute(sa.text("SELECT DISTINCT model FROM tiny_emb")).scalars().all()
    assert models == [str(tmp_path / "models" / "tiny")]
    found = cli_here("search", "--db", "sqlite:///demo.sqlite", "--target", "tiny_emb", "--model", "./models/tiny", "x")
    assert found.returncode == 0 and "differs" not in found.stderr, found.stderr


def test_the_packaged_model_s_hub_name_is_the_same_model_to_a_target(tmp_path):
    """`--model sentence-transformers/all-MiniLM-L6-v2`, the name the model hub gives it, was recorded as typed: a
    run by the short name then re-embedded every row as another model's, and search warned of a model mismatch."""
    url = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    seed_demo(url, n=20)
    first = cli(*run_args(url, "hub_emb", "--master", "local[1]", "--model", "sentence-transformers/all-MiniLM-L6-v2"))
    assert first.returncode == 0, first.stderr
    again = cli(*run_args(url, "hub_emb", "--master", "local[1]", "--mode", "incremental"))
    assert again.returncode == 0, again.stderr
    assert "0/0 rows" in again.stdout and "skipped 20" in again.stdout, again.stdout
    with db.engine_for(url).connect() as conn:
        assert conn.execute(sa.text("SELECT DISTINCT model FROM hub_emb")).scalars().all() == ["all-MiniLM-L6-v2"]
    found = cli("search", "--db", url, "--target", "hub_emb", "--model", "sentence-transformers/all-MiniLM-L6-v2", "x")
    assert found.returncode == 0 and "differs" not in found.stderr, found.stderr


def test_names_typed_in_another_case_are_the_catalog_s_tables_and_columns(tmp_path):
    """SQLite (and SQL Server) read `PRODUCTS` as `products`, and so did the checks, but not all of SQLAlchemy's
    reflection: `--target CI_EMB` over `ci_emb` ended in NoSuchTableError (run and search), `--id-column ID` was
    "not in table", and a target filled from `PRODUCTS` (or `main.products`, the default schema's name) refused a
    run from `products` as another table's."""
    url = f"sqlite:///{tmp_path / 'demo.sqlite'}"
    seed_demo(url, n=20)
    first = cli("run", "--db", url, "--source", "main.PRODUCTS", "--id-column", "ID", "--text-column",
                "Description", "--target", "main.ci_emb", "--master", "local[1]")
    assert first.returncode == 0, first.stderr
    again = cli(*run_args(url, "CI_EMB", "--master", "local[1]"))
    assert again.returncode == 0, again.stderr
    assert "0/0 rows" in again.stdout and "skipped 20" in again.stdout, again.stdout
    with db.engine_for(url).connect() as conn:
        assert conn.execute(sa.text("SELECT target, source, id_column, text_column FROM embeddeck_targets")).all() \
            == [("ci_emb", "products", "id", "description")]
    runs = json.loads(cli("list", "--json").stdout)[:2]
    assert [(r["source"], r["target"]) for r in runs] == [("products", "ci_emb")] * 2
    found = cli("search", "--db", url, "--target", "Ci_Emb", "--json", "-k", "1", "lamp")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)[0]["text"], found.stdout  # the source's text, found by the target's origin


@pytest.mark.parametrize("env", [{"EMBEDDECK_HOME": "state"},
                                 {"EMBEDDECK_REGISTRY_URL": "sqlite:///registry.sqlite"}])
def test_a_relative_home_or_registry_names_the_same_files_in_the_run_s_driver(tmp_path, fast_model, env):
    """With EMBEDDECK_HOME=state (or a relative registry URL), the driver, which starts in another folder, looked for
    its run in another registry and died ("killed or crashed")."""
    env = dict(os.environ, PYTHONPATH=str(REPO), EMBEDDECK_HOME=str(tmp_path / "home")) | env

    def cli_here(*args):
        return subprocess.run([sys.executable, "-m", "jobs", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=env)

    assert cli_here("seed-demo", "--rows", "20").returncode == 0
    out = cli_here("run", "--source", "products", "--id-column", "id", "--text-column", "description", "--target",
                   "rel_emb", "--master", "local[1]", "--model", fast_model)
    assert out.returncode == 0 and "20/20 rows" in out.stdout, out.stdout + out.stderr
    assert not (REPO / "state").exists() and not (REPO / "registry.sqlite").exists()


def test_a_memory_size_spark_would_refuse_is_named_before_the_run_is_recorded(demo_url, monkeypatch):
    """EMBEDDECK_EXECUTOR_MEMORY=lots: spark-submit refused it ("Executor memory must be a positive number") and the
    run failed as "driver process exited without reporting an end (killed or crashed)"."""
    before = len(Registry().list())
    monkeypatch.setenv("EMBEDDECK_EXECUTOR_MEMORY", "lots")
    out = cli(*run_args(demo_url))
    assert out.returncode == 2
    assert out.stderr.strip() == "error: EMBEDDECK_EXECUTOR_MEMORY must be a memory size such as 512m or 2g, not 'lots'"
    assert len(Registry().list()) == before  # nothing recorded


def test_a_run_and_its_follower_ride_out_a_database_restart(pg_url, hold_file):
    """As on ACA, the data and the registry in one database, stopped for 3 s under a run (a failover, a restart):
    the run failed as "driver process exited without reporting an end (killed or crashed)", and `run` exited 2 when
    its registry did not answer. Tasks and driver now wait for the database (EMBEDDECK_DB_OUTAGE_S), as `run` does."""
    engine = db.engine_for(pg_url)
    with engine.begin() as conn:
        for name in ("outage_emb", "outage_items"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        conn.execute(sa.text("CREATE TABLE outage_items (id INTEGER PRIMARY KEY, body TEXT)"))
        conn.execute(sa.text("INSERT INTO outage_items VALUES (:id, :body)"),
                     [{"id": i, "body": f"a blue chair with arms, model {i}"} for i in range(1, ROWS + 1)])
    follower = subprocess.Popen([sys.executable, "-m", "jobs", "run", "--db", pg_url, "--source", "outage_items",
                                 "--id-column", "id", "--text-column", "body", "--target", "outage_emb", "--master",
                                 "local[2]"], env=dict(os.environ, EMBEDDECK_REGISTRY_URL=pg_url),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        registry = Registry(pg_url)
        # Held after its first commit, however fast the machine encodes.
        wait_until(lambda: any(r.rows_done for r in registry.list(active_only=True) if r.target == "outage_emb"),
                   timeout=300)
        postgres.stop(pg_url)
        try:
            hold_file.unlink()
            time.sleep(3)
            assert follower.poll() is None, follower.communicate()
        finally:
            postgres.start(pg_url)
        out, err = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    assert f"{ROWS}/{ROWS} rows" in out
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outage_emb")).scalar() == ROWS


def test_wrong_password_exit_2_without_the_password(pg_url):
    bad = pg_url.replace("s3cret-pg", "Wr0ngPassw0rd")
    out = cli(*run_args(bad))
    assert out.returncode == 2
    assert "Wr0ngPassw0rd" not in out.stderr + out.stdout and "password authentication failed" in out.stderr


def test_status_of_unknown_run():
    out = cli("status", "r-nope")
    assert out.returncode == 2 and "run r-nope does not exist" in out.stderr


def test_serve_on_a_port_in_use_says_so_with_exit_2(monkeypatch):
    """uvicorn exits 3 when it cannot bind, and 3 is a cancelled run's status here."""
    monkeypatch.setenv("EMBEDDECK_API_TOKEN", "t" * 32)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = cli("serve", "--host", "127.0.0.1", "--port", str(port), timeout=60)
    assert out.returncode == 2 and f"port {port} is in use" in out.stderr


@pytest.mark.parametrize("command", [["-m", "jobs", "serve", "--port", "1"], ["-m", "jobs.doors.jupyter"]])
@pytest.mark.parametrize("setting,message", [
    (("EMBEDDECK_MAX_WORKERS", "four"), "EMBEDDECK_MAX_WORKERS must be an integer of at least 0, not 'four'"),
    # Else every run posted got a 400 naming a master the caller never chose.
    (("EMBEDDECK_SPARK_MASTER", "spark://controller"), "EMBEDDECK_SPARK_MASTER: master must be local[N] (N 1 or "
                                                       "more, or *) or spark://host:port, not 'spark://controller': a "
                                                       "host and a port from 1 to 65535, nothing else"),
])
def test_the_api_and_jupyter_refuse_settings_set_wrong_as_they_start(tmp_path, command, setting, message):
    """A worker limit that is no number surfaced as a 400 on the API's first `workers` request, and in a kernel's
    run; the doors now name it as they start, and start nothing."""
    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_API_TOKEN="t" * 32, **dict([setting]))
    out = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: {message}" in out.stderr


def test_a_port_is_taken_while_listened_on_and_free_in_time_wait():
    """As servers bind it (SO_REUSEADDR): a dashboard stopped and started again at once found its port "in use" for
    a minute by a plain bind, while the last connections waited in TIME_WAIT."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    assert port_taken(port) and port_taken(port, "0.0.0.0")
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server's side closes first, so its end waits in TIME_WAIT
    client.close()
    server.close()
    assert not port_taken(port)


def test_a_free_port_is_one_no_connection_or_bind_to_port_0_can_take_meanwhile():
    """free_port had the kernel choose, from its ephemeral range, where every outgoing connection and bind(0) take
    their ports: a Spark master lost its web UI port so to the other test worker's processes, in the second between
    the choice and its bind. Ports now come from below that range, at random, each free when chosen."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    ports = [free_port() for _ in range(20)]
    assert all(FREE_PORT_FLOOR <= port < ephemeral for port in ports), ports
    assert len(set(ports)) > 10, ports  # not one sequence that two test workers would both follow
    with socket.create_server(("127.0.0.1", ports[0])):
        assert port_taken(ports[0]) and ports[0] not in [free_port() for _ in range(200)]
    # A kernel whose ephemeral range starts low (`1024 65535`, as some tune it) leaves no room: free_port binds port 0.
    assert ports_below(1024) == []
    assert sorted(ports_below(FREE_PORT_FLOOR + 3)) == [FREE_PORT_FLOOR, FREE_PORT_FLOOR + 1, FREE_PORT_FLOOR + 2]


@pytest.mark.parametrize("command", [("jobs", "list", "--json"), ("cluster", "status", "--json")])
def test_a_reader_that_closes_the_pipe_gets_no_traceback(command):
    """`python -m jobs list --json | head` printed a BrokenPipeError traceback; now the CLI stops quietly with
    the shell's status for SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        out = subprocess.run([sys.executable, "-m", *command], stdout=write_end, stderr=subprocess.PIPE, text=True,
                             timeout=120, env=dict(os.environ))
    finally:
        os.close(write_end)
    assert (out.returncode, out.stderr) == (141, "")


def test_db_takes_a_configured_connection_name(demo_url, tmp_path, monkeypatch):
    """`--db URL` put a password in `ps`: a configured connection's name works instead."""
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'[connections.demo]\nurl = "{demo_url}"\n')
    monkeypatch.setenv("EMBEDDECK_SECRETS_FILE", str(secrets))
    out = cli("search", "--db", "demo", "--target", "nope", "boots")
    assert out.returncode == 2 and "target table 'nope' does not exist (tables: products" in out.stderr


def test_a_detached_run_beyond_the_cap_says_it_waits_and_starts_at_the_next_status(demo_url, tmp_path, monkeypatch,
                                                                                  fast_model):
    """A detached run held back by the cap printed nothing but its id, although only a reader on this host can
    start it; it now says so, and the next `status` here starts it once the slot is free."""
    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path / "home"))  # this test's own registry
    monkeypatch.setenv("EMBEDDECK_MAX_ACTIVE_RUNS", "1")
    registry = Registry()
    busy = registry.create("{}", "test", "products", "busy_emb", "m", "local[1]", target_key="busy")
    out = cli(*run_args(demo_url, "waiting_emb", "--master", "local[1]", "--model", fast_model, "--detach"))
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    assert registry.get(run_id).phase == "waiting"
    assert f"run {run_id} waits for a slot" in out.stderr and "the next `status`" in out.stderr
    registry.finish(busy, "cancelled", error="test")
    assert cli_status(run_id)["phase"] != "waiting"
    assert wait_status(run_id, ended, 300)["state"] == "succeeded"
