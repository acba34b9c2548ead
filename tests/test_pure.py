"""Pure logic: spec validation, texts, vector codecs, planning, progress."""

import decimal
import itertools
import re
import uuid

import numpy as np
import pytest

from jobs.core import plan, progress, texts, vectors
from jobs.core.errors import BadRequest
from jobs.core.spec import RunSpec, check_master_url


def spec(**kw):
    base = dict(db_url="sqlite:///x.db", source="s", id_column="id", text_column="t", target="t_emb")
    base.update(kw)
    return RunSpec(**base)


def test_spec_shape_accepts_defaults():
    spec().check_shape()


@pytest.mark.parametrize("kw,message", [
    (dict(mode="partial"), "mode must be one of"),
    (dict(batch_size=0), "batch size"),
    (dict(partitions=0), "partitions"),
    (dict(source=""), "source is empty"),
    (dict(target="s"), "must differ"),
    (dict(master="yarn"), "master must be"),
    # found by schemathesis: a NUL in a table name was a driver error (500)
    (dict(source="\x05T3\x00q"), r"source .*\\x05.* contains the control character"),
    (dict(text_column="a\x1eb"), "text_column .* contains the control character"),
    (dict(target="t\udc33"), "target .* is not valid Unicode"),
    (dict(id_column="\U000364d3 ok"), None),  # any real character is fine: the database decides
])
def test_spec_shape_rejects(kw, message):
    if message is None:
        spec(**kw).check_shape()
        return
    with pytest.raises(BadRequest, match=message):
        spec(**kw).check_shape()


@pytest.mark.parametrize("master,problem", [
    *[(m, None) for m in ("local", "local[1]", "local[*]", "local[16]", "local[2,3]", "local[*, 4]",
                          "spark://127.0.0.1:7077", "spark://spark-master.internal:7077", "spark://[::1]:7077")],
    *[(m, "not") for m in ("local[0]", "local[x]", "local[]", "local[-1]", "local[2,0]", "localhost", "LOCAL[1]",
                           "yarn", "k8s://https://h:443", "spark:/h:7077", "")],
    *[(m, "a host and a port from 1 to 65535") for m in ("spark://h", "spark://h:0", "spark://h:99999", "spark://h:x",
                                                          "spark://:7077", "spark://h:7077/", "spark://u@h:7077",
                                                          "spark://h:7077?x=1")],
    ("spark://a:7077,b:7077", "one master, not a list of standbys"),
])
def test_masters_are_those_spark_takes(master, problem):
    if problem is None:
        check_master_url(master)
        return
    with pytest.raises(BadRequest, match=re.escape(problem)):
        check_master_url(master)


@pytest.mark.parametrize("name", ["~\u00f2\u009a\u00c0", "~", "a\x00b", "x" * 300, "/no/such/model"])
def test_model_names_that_are_no_directory_are_a_spec_error(name):
    """Found by schemathesis: "~user" raised RuntimeError, a 300-char name OSError (both were a 500)."""
    from jobs.embed.encoder import model_path

    with pytest.raises(BadRequest, match="is neither all-MiniLM-L6-v2 nor a local sentence-transformers"):
        model_path(name)


def test_spec_json_round_trip_and_unknown_fields():
    s = spec(partitions=3, mode="full")
    assert RunSpec.from_json(s.to_json()) == s
    with pytest.raises(BadRequest, match="unknown run spec fields: bogus"):
        RunSpec.from_json('{"bogus": 1}')


@pytest.mark.parametrize("raw,expected", [
    (None, None), ("", None), ("   \n\t", None), ("hi", "hi"),
    (b"caf\xe9 au lait", "caf\ufffd au lait"), ("a\x00b", "a b"), (42, "42"),
])
def test_normalize_text(raw, expected):
    assert texts.normalize_text(raw) == expected


def test_normalize_truncates_huge_text():
    assert len(texts.normalize_text("x" * 1_000_000)) == texts.MAX_TEXT_CHARS


def test_content_hash_is_stable_and_text_sensitive():
    assert texts.content_hash("abc") == texts.content_hash("abc")
    assert texts.content_hash("abc") != texts.content_hash("abd")
    assert len(texts.content_hash("\ud83d")) == 64  # lone surrogate does not crash


def test_vector_codecs_round_trip():
    v = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    b = vectors.to_bytes(v)
    assert len(b) == 1536
    assert np.array_equal(vectors.from_bytes(b, 384), v)
    assert np.array_equal(vectors.matrix_from_blobs([b, b], 384)[1], v)
    assert np.allclose(vectors.from_json(vectors.to_json(v)), v)
    with pytest.raises(ValueError, match="384"):
        vectors.from_bytes(b[:-4], 384)
    with pytest.raises(ValueError, match="384"):
        vectors.matrix_from_blobs([b, b[:8]], 384)


@pytest.mark.parametrize("rows,parts", [(100, 4), (3, 8), (1, 2), (1011, 7), (0, 3)])
def test_split_ends_cover_the_rows_in_near_equal_parts(rows, parts):
    ends = plan.split_ends(rows, parts)
    assert len(ends) == min(parts, rows)
    sizes = [b - a for a, b in itertools.pairwise([-1] + ends)]
    assert sum(sizes) == rows and (not sizes or (min(sizes) >= 1 and max(sizes) - min(sizes) <= 1))


@pytest.mark.parametrize(("ends", "want"), [
    ([4, 10**12], [(None, 4), (4, 10**12)]),
    ([7], [(None, 7)]),  # one row
    ([5, 5, 9], [(None, 5), (5, 9)]),  # a repeated id (the run refuses it when it reads the rows) adds no range
    (["b", "B", "a"], [(None, "b"), ("b", "B"), ("B", "a")]),  # the database's order, not Python's
    ([], []),
])
def test_ranges_end_at_the_ids_where_the_rows_divide(ends, want):
    assert [(r.after, r.hi) for r in plan.ranges_ending_at(ends)] == want
    assert [r.index for r in plan.ranges_ending_at(ends)] == list(range(len(want)))


@pytest.mark.parametrize("text,h,sh,sm,mode,expected", [
    (None, None, None, None, "incremental", False),
    ("t", "h", None, None, "incremental", True),
    ("t", "h", "h", "m", "incremental", False),
    ("t", "h", "old", "m", "incremental", True),
    ("t", "h", "h", "other", "incremental", True),
    ("t", "h", "h", "m", "full", True),
])
def test_needs_vector(text, h, sh, sm, mode, expected):
    assert plan.needs_vector(text, h, sh, sm, "m", mode) is expected


@pytest.mark.parametrize("previous, ids, expected", [
    (None, [1, 2, 5], None), (4, [5, 9], None), (None, [], None),
    (None, [1, 2, 2, 3], 2), (5, [5, 6], 5),  # the chunk before ended on 5
    (None, ["b", "a", "a"], "a"),  # text in the server's collation: its order need not be Python's
    (None, ["Z", "a", "B"], None),
])
def test_a_repeated_id_is_one_equal_to_its_neighbour(previous, ids, expected):
    assert plan.repeated_id(previous, ids) == expected


def test_an_error_names_a_text_or_uuid_id_quoted_and_a_number_as_it_is():
    """`id T-1 is in more than one row` hid the key's carriage return (a CSV's line end) from whoever looked it up."""
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert [plan.shown_id(v) for v in (8, decimal.Decimal("8"), "T-1\r", "8", key)] == [
        "8", "8", "'T-1\\r'", "'8'", "'12345678-1234-5678-1234-567812345678'"]


def test_rate_and_eta():
    samples = [(0.0, 0), (10.0, 100), (20.0, 300)]
    assert progress.rate(samples, window_s=15) == pytest.approx(15.0)
    assert progress.rate(samples[:1]) == 0.0
    assert progress.eta_seconds(1000, 300, 10.0) == 70.0
    assert progress.eta_seconds(None, 0, 10.0) is None
    assert progress.eta_seconds(10, 0, 0.0) is None
    assert progress.format_duration(185) == "3m05s"
    assert progress.format_duration(None) == "—"


def test_start_breakdown_cold_and_warm():
    cold = {"driver_started": 3.0, "app_ready": 10.0, "worker_started": 22.0, "model_ready": 24.5,
            "planned": 27.0, "first_commit": 28.5, "model_load_s": 0.5}
    stages = progress.start_breakdown(cold)
    assert stages == pytest.approx({"jvm": 3.0, "spark_app": 7.0, "python_worker": 12.0, "model_load": 2.5,
                                    "planning": 2.5, "first_batch": 1.5})
    assert sum(stages.values()) == pytest.approx(28.5)  # the stages add up to the first commit
    # On the run service the driver, application and worker predate the launch: those stages are 0.
    warm = progress.start_breakdown({"worker_started": -300.0, "model_ready": 0.3, "planned": 2.0,
                                     "first_commit": 3.0})
    assert warm == pytest.approx({"jvm": 0, "spark_app": 0, "python_worker": 0, "model_load": 0.3,
                                  "planning": 1.7, "first_batch": 1.0})
    assert progress.start_breakdown({}) == dict.fromkeys(warm, 0.0)  # a run that never started


@pytest.mark.parametrize("n,batch_size,first_commit,want", [
    (0, 128, True, []),
    (6, 128, True, [(0, 6, 6)]),
    (600, 128, True, [(0, 8, 8), (8, 600, 256)]),
    (600, 4, True, [(0, 4, 4), (4, 600, 256)]),  # a first commit is never more than one batch
    (600, 128, False, [(0, 600, 256)]),
])
def test_a_tasks_first_commit_is_its_shortest_rows_alone_then_one_pass_over_the_rest(n, batch_size, first_commit,
                                                                                     want):
    from jobs.core.plan import encode_spans

    got = encode_spans(n, batch_size, first_commit)
    assert [(span.start, span.stop, at_least) for span, at_least in got] == want


def test_batches_are_gathered_into_commits_of_at_least_the_commit_rows_in_order():
    from jobs.core.plan import gather

    sizes = [70, 70, 70, 70, 70, 30, 200, 10]
    groups = list(gather(iter(sizes), lambda rows: rows, 256))
    assert groups == [[70, 70, 70, 70], [70, 30, 200], [10]]
    assert list(gather(iter([]), len, 256)) == []


def test_masters_are_compared_by_where_they_are_not_by_spelling():
    """spark://localhost:P and spark://127.0.0.1:P once made a second application that waited with 0 cores."""
    from jobs.spark.submit import same_master

    assert same_master("spark://localhost:7077", "spark://127.0.0.1:7077")
    assert same_master("spark://127.0.0.1", "spark://127.0.0.1:7077")
    assert not same_master("spark://127.0.0.1:7077", "spark://127.0.0.1:7078")
    assert not same_master("local[2]", "spark://127.0.0.1:7077")


def test_worker_seconds_follow_the_sampled_counts_over_the_run():
    from jobs.core.cost import worker_seconds

    samples = [(0.0, 0), (10.0, 2), (40.0, 1), (100.0, 0)]
    assert worker_seconds(samples, (5.0, 100.0)) == 2 * 30 + 1 * 60  # a count holds until the next sample
    assert worker_seconds(samples, (50.0, 70.0)) == 20
    assert worker_seconds(samples, (100.0, 200.0)) == 0
    assert worker_seconds([], (0.0, 10.0)) == 0 and worker_seconds(samples, (10.0, 10.0)) == 0
    assert worker_seconds([(20.0, 3)], (0.0, 30.0)) == 30  # before the first sample nothing is known to run


def test_a_sample_that_repeats_the_last_kept_one_and_leaves_no_long_silence_is_redundant():
    from jobs.core.samples import redundant

    every_5s = [(float(t), 2) for t in range(0, 125, 5)]  # 0 .. 120 s at 2 workers
    gone = redundant(every_5s, gap_s=60)
    kept = [at for i, (at, _) in enumerate(every_5s) if i not in gone]
    assert kept == [0.0, 60.0, 120.0]  # no two kept ones more than 60 s apart, the first and the last kept
    changes = [(0.0, 2), (5.0, 2), (10.0, 1), (15.0, 1), (20.0, 2)]
    assert redundant(changes, gap_s=60) == [1, 3]  # each change stays; so does its first sample
    silence = [(0.0, 2), (5.0, 2), (100.0, 2), (105.0, 2)]
    assert redundant(silence, gap_s=60) == []  # the samples around a silence mark it for the chart
    assert redundant([(0.0, 1), (5.0, 1)]) == []


def test_overlapping_runs_share_the_workers_so_costs_add_up_to_the_bill():
    from jobs.core.cost import worker_seconds

    samples = [(0.0, 2)]
    a, b = (0.0, 100.0), (50.0, 150.0)
    cost_a, cost_b = worker_seconds(samples, a, [b]), worker_seconds(samples, b, [a])
    assert cost_a == 2 * 50 + 2 * 50 / 2 and cost_b == 2 * 50 / 2 + 2 * 50
    assert cost_a + cost_b == 2 * 150


def test_run_cost_label_names_units_rate_and_source():
    from jobs.core.cost import Pricing, run_cost

    local = run_cost(120.0, Pricing("core", 1.0))
    assert local.label() == "120.0 core-seconds (120.0 worker-seconds) · no price configured"
    gpu = run_cost(100.0, Pricing("GPU", 1.0, 0.0005, "USD", "Azure retail price, swedencentral"))
    assert gpu.amount == pytest.approx(0.05)
    assert gpu.label() == ("100.0 GPU-seconds (100.0 worker-seconds) ≈ 0.0500 USD at 0.0005 USD/GPU-second, "
                           "Azure retail price, swedencentral")


def test_stopping_a_group_also_stops_what_its_leader_started_while_shutting_down(tmp_path):
    """A Spark worker given SIGTERM still launches the executors its master asks for, then exits: those
    outlived it and served tasks on a worker that no longer existed. Here the leader starts a child on
    SIGTERM, as the worker did, and exits; stop_group leaves nothing of the group running."""
    import subprocess
    import time

    import psutil

    from jobs.core.processes import stop_group

    late_pid = tmp_path / "late.pid"
    script = f"trap 'sleep 60 & echo $! > {late_pid}; exit 0' TERM; sleep 100 & wait"
    leader = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while not psutil.Process(leader.pid).children() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop_group(leader.pid, leader.pid, grace_s=5)
    leader.wait(5)
    late = int(late_pid.read_text())
    assert not psutil.pid_exists(late) or psutil.Process(late).status() == psutil.STATUS_ZOMBIE


def test_groups_stopped_together_take_the_slowest_ones_time_and_leave_nothing(tmp_path):
    """`cluster down` stops the master and every worker, each about 2 s to exit on SIGTERM: together, not one
    after another. Each leader here takes 1 s to exit and starts a late child on its way out."""
    import subprocess
    import time

    import psutil

    from jobs.core.processes import stop_groups

    leaders = []
    for i in range(3):
        script = f"trap 'sleep 60 & echo $! > {tmp_path}/late{i}.pid; sleep 1; exit 0' TERM; sleep 100 & wait"
        leaders.append(subprocess.Popen(["bash", "-c", script], start_new_session=True))
    deadline = time.monotonic() + 10
    while not all(psutil.Process(p.pid).children() for p in leaders) and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    stop_groups({p.pid: p.pid for p in leaders}, grace_s=5)
    took = time.monotonic() - t0
    for i, leader in enumerate(leaders):
        leader.wait(5)
        late = int((tmp_path / f"late{i}.pid").read_text())
        assert not psutil.pid_exists(late) or psutil.Process(late).status() == psutil.STATUS_ZOMBIE
    assert took < 2.5, f"three groups of 1 s each took {took:.1f} s: stopped one after another"


def test_a_process_start_time_is_read_to_the_clock_tick():
    """A run's start-up stages count from when its driver and Python workers started. psutil's create_time
    counts from the boot time's whole second, so it read up to 1 s early and moved that second from one stage to
    its neighbour (a VM here: 0.96 s)."""
    import subprocess
    import time

    from jobs.core.processes import started_at

    before = time.time()
    child = subprocess.Popen(["sleep", "5"])
    after = time.time()
    try:
        assert before - 0.02 <= started_at(child.pid) <= after + 0.02  # /proc counts in 10 ms ticks
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(("cores", "rows", "want"), [(2, 200, 2), (2, 1999, 2), (2, 2000, 4), (2, 3000, 4),
                                                     (2, 5000, 4), (2, 7999, 6), (2, 10**6, 8), (1, 10, 2),
                                                     (1, 2500, 2), (1, 4000, 4), (8, 100, 8), (8, 20_000, 16),
                                                     (8, 10**5, 32)])
def test_ranges_follow_the_rows_two_per_core_for_balance_up_to_four_and_a_whole_number_per_core(cores, rows, want):
    assert plan.default_partitions(cores, rows) == want


def test_spark_processes_import_the_installed_pyspark_where_it_is_the_zips_version(tmp_path, monkeypatch):
    """Spark puts its pyspark and py4j zips first on its Python processes' path; Python compiled zipped pyspark
    from source at every driver, daemon and worker start (0.4-0.8 s each here). The installed packages of the same
    version are used instead, and a zip whose version differs from the installed one is kept."""
    import sys
    import zipfile
    from pathlib import Path

    import pyspark

    from jobs.spark.python_path import use_installed_pyspark

    lib = Path(pyspark.__file__).parent / "python" / "lib"
    zips = [str(z) for z in sorted(lib.glob("*.zip"))]
    assert {Path(z).name.split("-")[0] for z in zips} == {"pyspark.zip", "py4j"}
    other = tmp_path / "other" / "pyspark.zip"
    other.parent.mkdir()
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("pyspark/version.py", '__version__ = "0.0.1"\n')
    monkeypatch.setattr(sys, "path", [*zips, *sys.path])
    sys.path_importer_cache[zips[0]] = None  # as if something had been looked up in it
    assert use_installed_pyspark() == zips and not set(zips) & set(sys.path) and zips[0] not in sys.path_importer_cache
    monkeypatch.setattr(sys, "path", [str(other), *sys.path])
    assert use_installed_pyspark() == [] and sys.path[0] == str(other)


@pytest.mark.parametrize("text,message", [
    # What str(Py4JJavaError) gave for a run whose run service was stopped under it (`cluster down` before it
    # cancelled runs): the first line names only the JVM call.
    ("An error occurred while calling z:org.apache.spark.api.python.PythonRDD.collectAndServe.\n"
     ": org.apache.spark.SparkException: Job 2 cancelled because SparkContext was shut down\n"
     "\tat org.apache.spark.scheduler.DAGScheduler.cleanUpAfterSchedulerStop(DAGScheduler.scala:2060)",
     "the run's Spark application stopped while the run was in flight"),
    ("An error occurred while calling o42.collect.\n: org.apache.spark.SparkException: Job aborted due to stage "
     "failure: Task 0 in stage 1.0 failed 4 times\n\tat org.apache.spark.scheduler.DAGScheduler.failJobAndIndepen"
     "dentStages(DAGScheduler.scala:2898)",
     "org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 1.0 failed 4 times"),
    ("An error occurred while calling o42.collect.\n: org.apache.spark.SparkException: Job aborted\nTraceback:\n"
     "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) no such table: products",
     "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) no such table: products"),
])
def test_a_failed_runs_error_is_its_root_cause(text, message):
    from jobs.embed.pipeline import spark_error_message

    assert spark_error_message(RuntimeError(text)).startswith(message)
