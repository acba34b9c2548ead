"""The Spark job end to end, in-process on a real local[2] SparkSession: SQLite and PostgreSQL."""

import numpy as np
import pytest
import sqlalchemy as sa

from jobs.core.spec import RunSpec
from jobs.core.texts import normalize_text
from jobs.embed import pipeline
from jobs.store import db
from jobs.store.demo import products
from jobs.store.registry import Registry
from tests.conftest import reference_vectors

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
    pipeline.execute(spark.sparkContext, spec, registry, run_id)
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
