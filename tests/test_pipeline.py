"""The Spark job end to end, in-process on a real local[2] SparkSession: SQLite and PostgreSQL."""

import functools
import itertools
import sqlite3
import threading
import uuid

import numpy as np
import pytest
import sqlalchemy as sa

from jobs.core.errors import BadRequest, Unavailable
from jobs.core.spec import RunSpec
from jobs.core.texts import normalize_text
from jobs.doors.cli import progress_line
from jobs.embed import pipeline
from jobs.store import db
from jobs.store.demo import products
from jobs.store.registry import Registry
from tests import postgres
from tests.conftest import embeddings_endpoint, reference_vectors, wait_until

pytestmark = pytest.mark.spark

SPECIAL = {
    9001: None,
    9002: "",
    9003: "   ",
    9004: "Great boots 🥾🔥 for snow ❄️ — ünïcödé too",
    9005: "tab\there\x07bell\x1bescape\r\nnew line",
    9006: "long text about shoes " * 50_000,  # ~1.1 MB
}


def load_source(url: str, name: str = "items", n: int = 150) -> sa.Table:
    engine = db.engine_for(url)
    table = sa.Table(name, sa.MetaData(), sa.Column("item_id", sa.BigInteger, primary_key=True),
                     sa.Column("descr", sa.Text))
    table.drop(engine, checkfirst=True)
    table.create(engine)
    rows = [{"item_id": p["id"], "descr": p["description"]} for p in products(n)]
    rows += [{"item_id": i, "descr": t} for i, t in SPECIAL.items()]
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    return table


def run(spark, url, source="items", target="items_emb", **kw):
    spec = RunSpec(db_url=url, source=source, id_column="item_id", text_column="descr", target=target,
                   partitions=3, **kw)
    registry = Registry()
    run_id = registry.create(spec.with_db_url(db.redact_url(url)).to_json(), "test", source, target,
                             spec.model, "local[2]")
    try:
        pipeline.execute(spark.sparkContext, spec, registry, run_id)
    except Exception as exc:  # as a driver records it: a run left active would pace the live pages of later tests
        registry.finish(run_id, "failed", error=str(exc))
        raise
    return registry.get(run_id)


def stored(url, target="items_emb", source="items"):
    engine = db.engine_for(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            f'SELECT t.source_id, t.embedding, t.model, s.descr FROM "{target}" t '
            f'JOIN "{source}" s ON s.item_id = t.source_id ORDER BY t.source_id')).all()
    return rows


def assert_matches_reference(rows, reference_model):
    texts = [normalize_text(r.descr) for r in rows]
    expected = reference_vectors(reference_model, texts)
    got = np.stack([np.frombuffer(r.embedding, "<f4") for r in rows])
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= 0.9999, f"min cosine {cos.min()}"


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'pipeline.sqlite'}"


def test_sqlite_end_to_end_then_incremental(spark, sqlite_url, reference_model):
    load_source(sqlite_url)
    first = run(spark, sqlite_url)
    assert first.state == "succeeded", first.error
    expected_ids = [p["id"] for p in products(150)] + [9004, 9005, 9006]
    rows = stored(sqlite_url)
    assert [r.source_id for r in rows] == expected_ids  # exactly one vector per non-empty row
    assert first.rows_total == first.rows_done == len(expected_ids)
    assert first.rows_skipped == 3  # NULL, empty, blank
    assert {r.model for r in rows} == {"all-MiniLM-L6-v2"}
    assert_matches_reference(rows, reference_model)

    again = run(spark, sqlite_url)
    assert (again.state, again.rows_total, again.rows_done) == ("succeeded", 0, 0)

    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        for i in (3, 50, 9004):
            conn.execute(sa.text("UPDATE items SET descr = descr || ' (revised)' WHERE item_id = :i"), {"i": i})
        conn.execute(sa.text("INSERT INTO items VALUES (20001, 'a brand new kettle'), (20002, 'new tent')"))
    third = run(spark, sqlite_url)
    assert (third.state, third.rows_total, third.rows_done) == ("succeeded", 5, 5)
    rows = stored(sqlite_url)
    assert len(rows) == len(expected_ids) + 2
    assert_matches_reference([r for r in rows if r.source_id in (3, 50, 9004, 20001, 20002)], reference_model)

    full = run(spark, sqlite_url, mode="full")
    assert full.rows_done == len(expected_ids) + 2


def test_non_utf8_bytes_are_embedded_with_replacement(spark, sqlite_url, reference_model):
    load_source(sqlite_url, n=5)
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (777, CAST(x'6361666520ff6c61697465' AS TEXT))"))
    result = run(spark, sqlite_url)
    assert result.state == "succeeded", result.error
    row = next(r for r in stored(sqlite_url) if r.source_id == 777)
    assert row.descr == "cafe \ufffdlaite"
    assert_matches_reference([row], reference_model)


def test_a_utf16_sqlite_database_is_embedded_as_its_texts(spark, tmp_path, reference_model):
    """A SQLite database made UTF-16 (as Windows tools may make it): a text holding a zero byte is read as its bytes,
    which there every text holds, and those bytes were decoded as UTF-8: "hello" was embedded as "h e l l o"."""
    path = tmp_path / "utf16.sqlite"
    with sqlite3.connect(path) as conn:  # the encoding holds from the first table on
        conn.execute("PRAGMA encoding = 'UTF-16le'")
        conn.execute("CREATE TABLE made_first (x INTEGER)")
    conn.close()
    url = f"sqlite:///{path}"
    load_source(url, n=20)
    with db.engine_for(url).begin() as conn:
        assert conn.exec_driver_sql("PRAGMA encoding").scalar() == "UTF-16le"
        conn.execute(sa.text("INSERT INTO items VALUES (778, :text)"), {"text": "a chair\x00 with arms"})
    result = run(spark, url)
    assert result.state == "succeeded", result.error
    rows = stored(url)
    assert len(rows) == 20 + 4  # SPECIAL's NULL, empty and blank have none
    assert_matches_reference(rows, reference_model)


def test_a_postgres_database_in_sql_ascii_is_embedded_as_its_utf8_texts(spark, pg_url, reference_model):
    """A legacy PostgreSQL database in SQL_ASCII (bytes of no declared encoding, UTF-8 as applications write them):
    psycopg handed its texts over as bytes, and the first query failed ("cannot connect …: cannot use a string
    pattern on a bytes-like object"). Texts are now asked for in UTF-8; one that is not UTF-8 is named by the server."""
    name = f"legacy_{uuid.uuid4().hex[:8]}"
    with db.engine_for(pg_url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text(
            f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"))
    url = sa.engine.make_url(pg_url).set(database=name).render_as_string(hide_password=False)
    load_source(url, n=20)
    result = run(spark, url)
    assert result.state == "succeeded", result.error
    rows = stored(url)
    assert len(rows) == 20 + 3 and any(not r.descr.isascii() for r in rows)
    assert_matches_reference(rows, reference_model)
    with db.engine_for(url).begin() as conn:
        conn.execute(sa.text("INSERT INTO items VALUES (779, convert_from('\\x636166e9'::bytea, 'SQL_ASCII'))"))
    with pytest.raises(Exception, match="invalid byte sequence"):
        run(spark, url)
    assert 'invalid byte sequence for encoding "UTF8": 0xe9' in Registry().list(limit=1)[0].error


def test_postgres_end_to_end(spark, pg_url, reference_model):
    load_source(pg_url, name="pg items", n=120)
    result = run(spark, pg_url, source="pg items", target="pg items emb")
    assert result.state == "succeeded", result.error
    rows = stored(pg_url, target="pg items emb", source="pg items")
    assert len(rows) == 120 + 3
    assert_matches_reference(rows, reference_model)
    assert run(spark, pg_url, source="pg items", target="pg items emb").rows_done == 0


def test_other_model_rows_are_reembedded(spark, sqlite_url):
    load_source(sqlite_url, n=10)
    run(spark, sqlite_url)
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE items_emb SET model = 'old-model' WHERE source_id IN (1, 2)"))
    assert run(spark, sqlite_url).rows_done == 2


def test_empty_source_succeeds_with_nothing_to_do(spark, sqlite_url):
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE items (item_id INTEGER PRIMARY KEY, descr TEXT)"))
    result = run(spark, sqlite_url)
    assert (result.state, result.rows_done) == ("succeeded", 0)


@pytest.mark.parametrize("db_name", ["sqlite", "postgres"])
def test_an_id_column_that_is_no_key_fails_the_run_naming_it_and_writes_nothing(spark, sqlite_url, pg_url, db_name):
    """A repeated id made the target flip between its rows' texts on every incremental run (SQLite), and one where
    a chunk ended between the two rows was skipped; rows with a NULL id were never embedded while the run said
    all were. Chunks of 4 rows put the repeat of id 8 at a chunk's end (rows 5-8, then 8 again)."""
    url = sqlite_url if db_name == "sqlite" else pg_url
    engine = db.engine_for(url)
    table = sa.Table("loose", sa.MetaData(), sa.Column("item_id", sa.Integer), sa.Column("descr", sa.Text))
    table.drop(engine, checkfirst=True)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"item_id": i, "descr": f"a chair, model {i}"} for i in range(1, 13)])
    for target in ("loose_emb", "loose_more_emb"):
        sa.Table(target, sa.MetaData()).drop(engine, checkfirst=True)
    whole = run(spark, url, source="loose", target="loose_emb", chunk_rows=4)
    assert (whole.state, whole.rows_done) == ("succeeded", 12), whole.error  # each chunk re-reads one row
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"item_id": 8, "descr": "another chair"}])
    with pytest.raises(BadRequest, match=r"id column 'item_id' of 'loose' is not unique: id 8 is in more than one "
                                         r"row\. A target keeps one vector per id"):
        run(spark, url, source="loose", target="loose_more_emb", chunk_rows=4)
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.descr == "another chair"))
        conn.execute(table.insert(), [{"item_id": None, "descr": f"no id {i}"} for i in range(3)])
    with pytest.raises(BadRequest, match="id column 'item_id' of 'loose' is NULL in 3 rows"):
        run(spark, url, source="loose", target="loose_more_emb")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM loose_more_emb")).scalar() == 0


def test_a_driver_plans_through_a_database_restart_and_not_beyond_the_outage_window(pg_url, monkeypatch):
    """A run whose driver planned while its database restarted failed at its first statement. Planning now waits
    for the database (EMBEDDECK_DB_OUTAGE_S), and fails once the window is spent."""
    engine = db.engine_for(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS restart_plan_emb"))
        conn.execute(sa.text("DROP TABLE IF EXISTS restart_plan"))
        conn.execute(sa.text("CREATE TABLE restart_plan (item_id INTEGER PRIMARY KEY, descr TEXT)"))
        conn.execute(sa.text("INSERT INTO restart_plan VALUES (:id, 'a lamp')"), [{"id": i} for i in range(1, 11)])
    spec = RunSpec(db_url=pg_url, source="restart_plan", id_column="item_id", text_column="descr",
                   target="restart_plan_emb")
    prepare = functools.partial(pipeline._through_outages, (engine,), pipeline._prepare, spec, 2)

    def away_for(seconds: float):
        postgres.stop(pg_url)
        timer = threading.Timer(seconds, postgres.start, [pg_url])
        timer.start()
        return timer

    timer = away_for(2.0)
    try:
        *_, rows, ranges = prepare()
    finally:
        timer.join()
    assert rows == 10 and len(ranges) >= 1
    monkeypatch.setenv("EMBEDDECK_DB_OUTAGE_S", "0.5")
    timer = away_for(3.0)
    try:
        with pytest.raises(Unavailable, match="cannot connect to"):
            prepare()
    finally:
        timer.join()


def test_a_driver_waits_out_its_registry_s_server_as_it_does_its_data_s(pg_url, sqlite_url):
    """The wait asked only the run's database whether it answered: a registry on another server (a shared
    PostgreSQL) that restarted, with the run's data answering all along, failed the run at its next registry
    write."""
    registry = Registry(pg_url)
    run_id = registry.create("{}", "test", "items", f"items_{uuid.uuid4().hex[:6]}", "m", "local[1]")
    ride = functools.partial(pipeline._through_outages, (db.engine_for(sqlite_url), registry.engine))
    postgres.stop(pg_url)
    timer = threading.Timer(2.0, postgres.start, [pg_url])
    timer.start()
    try:
        ride(registry.set_phase, run_id, "planning")
    finally:
        timer.join()
    assert registry.get(run_id).phase == "planning"


def test_a_run_failed_by_a_long_outage_is_recorded_once_its_registry_answers(spark, pg_url, monkeypatch):
    """A database away for longer than the window fails the run, and on ACA the registry is that database: the
    driver's record of the failure failed with it, and the run stayed "running". The end now waits out the
    registry too."""
    load_source(pg_url, "long_outage", n=10)
    spec = RunSpec(db_url=pg_url, source="long_outage", id_column="item_id", text_column="descr",
                   target="long_outage_emb")
    registry = Registry(pg_url)
    run_id = registry.create(spec.with_db_url(db.redact_url(pg_url)).to_json(), "test", spec.source, spec.target,
                             spec.model, "local[2]")
    # Away for 4 s against a window of 3: planning gives up at 3 s, the record of it waits until 6 s.
    monkeypatch.setenv("EMBEDDECK_DB_OUTAGE_S", "3")
    postgres.stop(pg_url)
    timer = threading.Timer(4.0, postgres.start, [pg_url])
    timer.start()
    try:
        with pytest.raises(Unavailable, match="cannot connect to"):
            pipeline.execute(spark.sparkContext, spec, registry, run_id)
    finally:
        timer.join()
    ended = registry.get(run_id)
    assert ended.state == "failed" and "cannot connect to" in ended.error and "***" in ended.error


def test_the_run_service_records_a_run_it_lost_to_its_registry_once_that_answers(spark, pg_url):
    """The run service outlives its runs, and readers on its host go by whether a run's driver (the service) lives:
    a run whose end was lost with the registry read "running" for as long as the service ran. The service now
    offers the end again until the registry takes it."""
    from jobs.spark import run_service

    registry = Registry(pg_url)
    run_id = registry.create("{}", "test", "items", f"items_{uuid.uuid4().hex[:6]}", "m", "local[2]")
    postgres.stop(pg_url)
    timer = threading.Timer(3.0, postgres.start, [pg_url])
    timer.start()
    try:
        run_service._serve_run(spark.sparkContext, registry, run_id, pg_url)  # the run as it is handed over
    finally:
        timer.join()
    ended = registry.get(run_id)
    assert ended.state == "failed" and "the run registry (EMBEDDECK_REGISTRY_URL): cannot connect to" in ended.error


def test_a_repeated_text_id_is_named_with_what_hides_in_it(spark, sqlite_url):
    """Keys imported from a CSV with their lines' carriage returns: the error named `id T-1`, and no row has that id."""
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tickets (item_id TEXT, descr TEXT)"))
        conn.execute(sa.text("INSERT INTO tickets VALUES (:k, :text)"), [
            {"k": "T-1\r", "text": "printer jams"}, {"k": "T-1\r", "text": "again"}, {"k": "T-2\r", "text": "vpn"}])
    with pytest.raises(BadRequest, match=r"of 'tickets' is not unique: id 'T-1\\r' is in more than one row"):
        run(spark, sqlite_url, source="tickets", target="tickets_emb")


@pytest.mark.parametrize(("declared", "values", "named"), [
    ("BIGINT", [1, 2, "abc", 2.5, b"\x01"], r"is declared BIGINT, but 3 of its ids are not integers \(such as 'abc'\)"),
    ("NUMERIC(10, 0)", [1, "x"], r"is declared NUMERIC\(10, 0\), but 1 of its ids are not integers \(such as 'x'\)"),
    ("VARCHAR(20)", ["a", b"\x01\x02"], r"is declared VARCHAR\(20\), but 1 of its ids are not text \(such as "
                                         r"X'0102'\)"),
])
def test_sqlite_ids_of_another_kind_than_declared_fail_the_run_naming_one(spark, sqlite_url, declared, values, named):
    """SQLite keeps any value in any column: a BIGINT key holding 'abc' failed the run on its first write with
    "datatype mismatch", a NUMERIC one with "must be real number, not str", and a blob in a text key made a target
    that search then failed on with a traceback. Each is named in planning, before a vector is written."""
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE mixed (item_id {declared} PRIMARY KEY, descr TEXT)"))
        for i, value in enumerate(values):
            conn.execute(sa.text("INSERT INTO mixed VALUES (:id, :text)"), {"id": value, "text": f"a lamp {i}"})
    with pytest.raises(BadRequest, match=r"id column 'item_id' of 'mixed' " + named + ": SQLite keeps any value"):
        run(spark, sqlite_url, source="mixed", target="mixed_emb")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM mixed_emb")).scalar() == 0


@pytest.mark.parametrize("db_name", ["sqlite", "postgres"])
def test_key_ranges_hold_equal_rows_however_the_ids_are_spread(spark, sqlite_url, pg_url, db_name):
    """Ranges split the id span evenly: one id far beyond the rest put every other row in the first range, so one
    task did all the work. They now end where the rows divide evenly; a limited run cuts at its last row."""
    url = sqlite_url if db_name == "sqlite" else pg_url
    engine = db.engine_for(url)
    table = sa.Table("spread", sa.MetaData(), sa.Column("item_id", sa.BigInteger, primary_key=True),
                     sa.Column("descr", sa.Text))
    table.drop(engine, checkfirst=True)
    table.create(engine)
    ids = [*range(-5, 55), 10**12]  # 61 rows
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"item_id": i, "descr": f"a lamp, model {i}"} for i in ids])
    for target in ("spread_emb", "spread_some_emb"):
        sa.Table(target, sa.MetaData()).drop(engine, checkfirst=True)
    tables = db.inspect_run(engine, RunSpec(db_url=url, source="spread", id_column="item_id", text_column="descr",
                                            target="spread_emb"))

    def rows_per_range(rows, parts):
        ranges = pipeline.key_ranges(engine, tables, rows, parts)
        assert ranges[0].after is None and all(a.hi == b.after for a, b in itertools.pairwise(ranges))
        return [sum((r.after is None or r.after < i) and i <= r.hi for i in ids) for r in ranges]

    assert rows_per_range(61, 3) == [21, 20, 20]
    assert rows_per_range(30, 3) == [10, 10, 10]  # a run limited to its first 30 rows
    assert rows_per_range(61, 100) == [1] * 61
    whole = run(spark, url, source="spread", target="spread_emb")
    assert (whole.state, whole.rows_done) == ("succeeded", 61), whole.error
    some = run(spark, url, source="spread", target="spread_some_emb", limit_rows=30)
    assert (some.state, some.rows_done) == ("succeeded", 30), some.error
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT max(source_id) FROM spread_some_emb")).scalar() == 24


@pytest.mark.parametrize("db_name", ["sqlite", "postgres"])
def test_a_view_is_a_source(spark, sqlite_url, pg_url, db_name, reference_model):
    """Operators embed a view that joins or concatenates columns (a label before each description)."""
    url = sqlite_url if db_name == "sqlite" else pg_url
    engine = db.engine_for(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP VIEW IF EXISTS labelled"))
    load_source(url, "base", n=20)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE VIEW labelled AS SELECT item_id, 'Item: ' || descr AS descr FROM base"))
    sa.Table("labelled_emb", sa.MetaData()).drop(engine, checkfirst=True)
    assert "labelled" in db.list_tables(engine)  # the Launch page's sources
    result = run(spark, url, source="labelled", target="labelled_emb")
    # The label makes the empty and blank texts non-empty; only the NULL one stays NULL.
    assert (result.state, result.rows_done, result.rows_skipped) == ("succeeded", 25, 1), result.error
    rows = stored(url, "labelled_emb", "labelled")
    assert len(rows) == 25 and all(r.descr.startswith("Item: ") for r in rows)
    assert_matches_reference(rows, reference_model)


def test_tables_in_other_schemas_are_listed_embedded_mirrored_and_searched(spark, pg_url):
    """SQL Server and PostgreSQL databases keep tables in schemas of their own (sales, hr): the Launch and Search
    pages listed the default schema's alone, though a run took `schema.table`; and no materialized view."""
    from jobs.embed import search

    engine = db.engine_for(pg_url)
    items = products(30)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA IF EXISTS sales CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA sales"))
        conn.execute(sa.text("CREATE TABLE sales.items (item_id BIGINT PRIMARY KEY, descr TEXT)"))
        conn.execute(sa.text("CREATE VIEW sales.labelled AS SELECT item_id, 'Item ' || descr AS descr "
                             "FROM sales.items"))
        conn.execute(sa.text("INSERT INTO sales.items VALUES (:id, :description)"), items)
        conn.execute(sa.text("CREATE MATERIALIZED VIEW sales.snapshot AS SELECT * FROM sales.labelled"))
    listed = db.list_tables(engine)
    assert {"sales.items", "sales.labelled", "sales.snapshot"} <= set(listed)
    assert not [n for n in listed if n.lower().startswith(("pg_", "information_schema", "sys."))]
    first = run(spark, pg_url, source="sales.items", target="sales.items_emb")
    assert (first.state, first.rows_done) == ("succeeded", 30), first.error
    assert "sales.items_emb" in db.list_targets(engine) and "sales.items" not in db.list_targets(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM sales.items WHERE item_id = :id"), {"id": items[0]["id"]})
    again = run(spark, pg_url, source="sales.items", target="sales.items_emb")
    assert (again.state, again.rows_done, again.rows_removed) == ("succeeded", 0, 1), again.error
    hit = search.search(pg_url, "sales.items_emb", items[4]["description"], k=1).hits[0]
    assert (hit.id, hit.text) == (items[4]["id"], normalize_text(items[4]["description"]))
    frozen = run(spark, pg_url, source="sales.snapshot", target="sales.snapshot_emb")  # a materialized view
    assert (frozen.state, frozen.rows_done) == ("succeeded", 30), frozen.error


@pytest.mark.parametrize(("db_name", "kind"), [("sqlite", "text"), ("postgres", "text"), ("postgres", "uuid")])
def test_text_and_uuid_keys_are_embedded_mirrored_and_searched(spark, sqlite_url, pg_url, db_name, kind,
                                                               reference_model):
    """SQL Server tables are often keyed by a uniqueidentifier or a code: such runs were refused ("key ranges need
    an integer id column"). Ranges follow the server's own order (mixed case sorts otherwise under a linguistic
    collation than in Python), chunks of 7 rows cross the ranges' ends, and search answers with the keys."""
    from jobs.embed import search

    url = sqlite_url if db_name == "sqlite" else pg_url
    engine = db.engine_for(url)
    keys = ([uuid.uuid5(uuid.NAMESPACE_URL, f"item/{i}") for i in range(40)] if kind == "uuid" else
            [f"{'aBcD'[i % 4]}{i % 7}-{i}" for i in range(38)] + ["", "Zoë's"])
    texts = [p["description"] for p in products(len(keys))]
    # A linguistic collation on PostgreSQL (ICU's root locale: a < B < c, where Python has B < a < c).
    key_type = sa.Uuid() if kind == "uuid" else sa.String(24, collation="und-x-icu" if db_name == "postgres" else None)
    table = sa.Table("coded", sa.MetaData(), sa.Column("item_id", key_type, primary_key=True),
                     sa.Column("descr", sa.Text))
    table.drop(engine, checkfirst=True)
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"item_id": k, "descr": t} for k, t in zip(keys, texts)])
    sa.Table("coded_emb", sa.MetaData()).drop(engine, checkfirst=True)
    first = run(spark, url, source="coded", target="coded_emb", chunk_rows=7)
    assert (first.state, first.rows_total, first.rows_done) == ("succeeded", 40, 40), first.error
    rows = stored(url, "coded_emb", "coded")
    assert sorted(map(str, (r.source_id for r in rows))) == sorted(map(str, keys))
    assert_matches_reference(rows, reference_model)
    stored_type = db.reflect(engine, "coded_emb").c.source_id.type  # the source's, collation and all
    assert (isinstance(stored_type, sa.Uuid) if kind == "uuid" else
            (stored_type.length, stored_type.collation) == (24, key_type.collation))

    with engine.begin() as conn:
        conn.execute(table.update().where(table.c.item_id == keys[3]).values(descr="a bright red kayak paddle"))
        conn.execute(table.delete().where(table.c.item_id == keys[-1]))
    again = run(spark, url, source="coded", target="coded_emb", chunk_rows=7)
    assert (again.state, again.rows_done, again.rows_removed) == ("succeeded", 1, 1), again.error

    found = search.search(url, "coded_emb", "red kayak paddle", k=3)
    shown = str(keys[3])  # a UUID as its text, as the API's JSON carries it
    assert (found.hits[0].id, found.hits[0].text) == (shown, "a bright red kayak paddle")
    assert all(isinstance(h.id, str) for h in found.hits)


@pytest.mark.parametrize("db_name", ["sqlite", "postgres"])
def test_a_run_removes_the_vectors_of_rows_deleted_or_emptied_in_the_source(spark, sqlite_url, pg_url, db_name):
    """Search kept finding rows deleted from the source, or whose text was emptied, by their old vectors. A run over
    the whole table now deletes those vectors and counts them; a limited run leaves rows it did not read alone."""
    url = sqlite_url if db_name == "sqlite" else pg_url
    engine = db.engine_for(url)
    table = load_source(url, "kept", n=30)
    sa.Table("kept_emb", sa.MetaData()).drop(engine, checkfirst=True)
    first = run(spark, url, source="kept", target="kept_emb")
    assert first.state == "succeeded" and not first.rows_removed, first.error
    ids = [r.source_id for r in stored(url, "kept_emb", "kept")]
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.item_id.in_([ids[0], ids[-1]])))  # the first and last ids
        conn.execute(table.update().where(table.c.item_id == ids[5]).values(descr=None))
        conn.execute(table.update().where(table.c.item_id == ids[6]).values(descr=" \t "))
    limited = run(spark, url, source="kept", target="kept_emb", limit_rows=3)
    assert (limited.state, limited.rows_removed) == ("succeeded", 0), limited.error
    again = run(spark, url, source="kept", target="kept_emb")
    assert (again.state, again.rows_done, again.rows_removed) == ("succeeded", 0, 4), again.error
    assert progress_line(again).endswith("skipped 34  removed 4")  # the CLI's line
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT source_id FROM kept_emb ORDER BY source_id")).scalars().all()
    assert left == [i for i in ids if i not in (ids[0], ids[-1], ids[5], ids[6])]
    with engine.begin() as conn:
        conn.execute(table.delete())
    emptied = run(spark, url, source="kept", target="kept_emb")
    assert (emptied.state, emptied.rows_removed) == ("succeeded", len(left)), emptied.error


def test_a_run_keeps_its_heartbeat_before_planning_and_while_it_removes_vectors(spark, pg_url):
    """Reading a large source's counts and ids before planning, and removing the vectors of rows gone from it after
    the embedding job, can each take minutes, and a reader on another host (Container Apps' dashboard and API apps
    share the registry) fails a run whose heartbeat is a minute old: the driver renewed it only from planning to the
    embedding job's end. Here a lock holds the run in each step."""
    import threading

    engine = db.engine_for(pg_url)
    table = load_source(pg_url, "beats", n=20)
    sa.Table("beats_emb", sa.MetaData()).drop(engine, checkfirst=True)
    registry = Registry()

    def held_run(lock: str, state: str, what: str, **params):
        ended = {}
        with engine.connect() as blocker:
            blocker.execute(sa.text(lock), params)
            thread = threading.Thread(target=lambda: ended.update(run=run(spark, pg_url, source="beats",
                                                                          target="beats_emb")))
            thread.start()
            first = wait_until(lambda: next((r for r in registry.list(5, active_only=True) if r.target == "beats_emb"
                                             and r.state == state and r.heartbeat_at), None), timeout=60)
            wait_until(lambda: registry.get(first.run_id).heartbeat_at > first.heartbeat_at, timeout=10, what=what)
            assert registry.get(first.run_id).state == state  # still held by the lock
            blocker.rollback()
        thread.join(60)
        return ended["run"]

    first = held_run("LOCK TABLE beats IN ACCESS EXCLUSIVE MODE", "queued", "a heartbeat before planning")
    assert first.state == "succeeded" and first.rows_done == first.rows_total > 0, first.error
    with engine.begin() as conn:
        gone = conn.execute(sa.select(table.c.item_id).limit(1)).scalar_one()
        conn.execute(table.delete().where(table.c.item_id == gone))
    again = held_run("SELECT 1 FROM beats_emb WHERE source_id = :id FOR UPDATE", "running",
                     "a heartbeat while the run removes vectors", id=gone)
    assert (again.state, again.rows_removed) == ("succeeded", 1), again.error


def test_no_secret_travels_in_a_task_closure(spark, pg_url, monkeypatch):
    """The pickled task functions once held the database password: now they carry the spec without its URL,
    and tasks read the URL (and an endpoint's key) from a broadcast that only the application's own
    executors fetch, destroyed when the run ends. Checked on what pyspark really ships."""
    from pyspark import serializers

    shipped = []
    dumps = serializers.CloudPickleSerializer.dumps
    monkeypatch.setattr(serializers.CloudPickleSerializer, "dumps",
                        lambda self, obj: shipped.append(dumps(self, obj)) or shipped[-1])
    load_source(pg_url, "closure_items", n=30)
    result = run(spark, pg_url, source="closure_items", target="closure_emb")
    assert result.state == "succeeded" and result.rows_done == 30 + 3, result.error  # + the 3 special texts
    password = db.make_url(pg_url).password.encode()
    assert len(shipped) >= 2 and not any(password in blob for blob in shipped)


def three_dimension_endpoint():
    """An OpenAI-compatible endpoint whose vectors have 3 dimensions; returns its base URL and server."""
    return embeddings_endpoint(lambda texts: [[1.0, float(len(t) % 7), 0.5] for t in texts])


def test_vectors_are_known_by_their_encoder_and_size(spark, sqlite_url, tmp_path, monkeypatch):
    """A remote endpoint's 3-dimension vectors were once stored as all-MiniLM-L6-v2: the next local run
    skipped every row and search crashed. Now the model column names the endpoint too, a target refuses
    vectors of another size, and search says what is wrong."""
    from jobs.core.errors import BadRequest
    from jobs.embed import search

    base, endpoint = three_dimension_endpoint()
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'[endpoints.tiny3]\nurl = "{base}"\n')
    monkeypatch.setenv("EMBEDDECK_SECRETS_FILE", str(secrets))
    try:
        load_source(sqlite_url, n=20)
        remote = run(spark, sqlite_url, target="dim3_emb", endpoint="tiny3")
        assert remote.state == "succeeded", remote.error
        assert {r.model for r in stored(sqlite_url, "dim3_emb")} == {"all-MiniLM-L6-v2@tiny3"}
        with pytest.raises(BadRequest, match="holds 3-dimension vectors; all-MiniLM-L6-v2 makes 384"):
            run(spark, sqlite_url, target="dim3_emb")  # the local model makes 384: refused, not skipped
        with pytest.raises(BadRequest, match="stored vectors have 3 dimensions, expected 384"):
            search.search(sqlite_url, "dim3_emb", "boots", model="all-MiniLM-L6-v2")
        assert search.search(sqlite_url, "dim3_emb", "boots").model == "all-MiniLM-L6-v2@tiny3"
    finally:
        endpoint.shutdown()


def test_reused_python_workers_leave_the_imported_modules_out_of_garbage_collection(spark):
    """PySpark's daemon collects garbage in a reused worker after every task. Over the ~220,000 objects that
    torch, the encoder and SQLAlchemy import, that took 0.1 s of a core at each task boundary; frozen before
    the daemon forks, they are never scanned, and a worker holding the model leaves the collector a fraction."""
    from jobs.core.spec import DEFAULT_MODEL

    def probe(_):
        import gc

        import sqlalchemy
        import torch

        list(pipeline.warm_partitions(DEFAULT_MODEL)(iter([])))
        scanned = {id(o) for o in gc.get_objects()}
        imported = (torch.nn.Linear, torch.nn.functional.linear, sqlalchemy.Table, pipeline.embed_partitions)
        yield gc.get_freeze_count(), len(scanned), [o for o in imported if id(o) in scanned]

    for frozen, scanned, left_in in spark.sparkContext.parallelize([0, 1], 2).mapPartitions(probe).collect():
        assert frozen > 100_000, frozen
        assert left_in == [], left_in
        # What the workers imported or cached later (another model's library, a database driver, compiled
        # statements of the runs before) is scanned: this module's runs alone leave about a third of the frozen
        # count (77,000 of 226,000); under pytest -n the session's SparkSession has served other files' runs
        # first, and their drivers and endpoints left up to 122,000.
        assert scanned < frozen, (scanned, frozen)


def test_python_workers_import_no_pyspark_from_sparks_zips(spark):
    """Spark puts its pyspark and py4j zips first on the workers' path: the daemon compiled pyspark from source
    at each executor start, and each worker forked from it re-read both zips at its own start, once per package
    imported from them (PySpark calls importlib.invalidate_caches()). The daemon imports the installed ones."""

    def probe(_):
        import sys

        import pyspark.worker

        yield pyspark.worker.__file__, [p for p in sys.path if p.endswith(".zip") and ("pyspark" in p or "py4j" in p)]

    for worker_module, zips in spark.sparkContext.parallelize([0, 1], 2).mapPartitions(probe).collect():
        assert ".zip" not in worker_module and not zips, (worker_module, zips)
