"""The database layer against real SQLite and PostgreSQL, and SQL Server by what it compiles."""

import contextlib
import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mssql, postgresql
from sqlalchemy.dialects.mssql import pyodbc as mssql_pyodbc
from sqlalchemy.schema import CreateIndex, CreateTable

from jobs.core.errors import BadRequest, Unavailable
from jobs.core.processes import free_port
from jobs.core.spec import RunSpec
from jobs.core.texts import MAX_TEXT_CHARS, normalize_text
from jobs.embed import search
from jobs.embed.encoder import get_encoder
from jobs.store import db
from jobs.store.demo import DEMO_MAX_ROWS, SEED_CHUNK_ROWS, product_chunks


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'data.sqlite'}"


def make_source(url, name="docs", id_col="id", text_col="body", rows=()):
    engine = db.engine_for(url)
    table = sa.Table(name, sa.MetaData(), sa.Column(id_col, sa.Integer, primary_key=True),
                     sa.Column(text_col, sa.Text))
    table.create(engine)
    if rows:
        with engine.begin() as conn:
            conn.execute(table.insert(), [{id_col: i, text_col: t} for i, t in rows])
    return table


def spec_for(url, **kw):
    base = dict(db_url=url, source="docs", id_column="id", text_column="body", target="docs_emb")
    base.update(kw)
    return RunSpec(**base)


def test_redact_url_hides_password():
    assert db.redact_url("postgresql://u:hunter2@h/db") == "postgresql://u:***@h/db"
    assert "hunter2" not in db.redact_url("mssql+pyodbc://u:hunter2@h/db?driver=ODBC+Driver+18")


@pytest.mark.parametrize("url,secret", [
    ("postgresql+psycopg://app@db.internal/prod?password=Qs3cret", "Qs3cret"),
    ("postgresql+psycopg://app:Us3rinfo@db.internal/prod", "Us3rinfo"),
    ("mssql+pyodbc:///?odbc_connect=DRIVER%3D%7BODBC+Driver+18+for+SQL+Server%7D%3BSERVER%3Ddb%3BUID%3Dsa%3BPWD%3DOdbcS3cret",
     "OdbcS3cret"),
    ("mssql+pyodbc://sa@db/prod?driver=ODBC+Driver+18+for+SQL+Server&Pwd=Sq1pwd", "Sq1pwd"),
    ("postgresql://app@db/prod?sslmode=require&api_key=K3yK3y", "K3yK3y"),
])
def test_every_secret_in_a_url_is_redacted(url, secret):
    shown = db.redact_url(url)
    assert secret not in shown and "***" in shown
    assert db.hide_secrets(f"connection to {url} failed: {secret} rejected", url).count(secret) == 0
    assert db.redact_url(shown) == shown  # stable: a stored, redacted URL redacts to itself


def test_missing_table_and_columns_are_named(sqlite_url):
    make_source(sqlite_url)
    engine = db.engine_for(sqlite_url)
    with pytest.raises(BadRequest, match="source table 'nope' does not exist"):
        db.inspect_run(engine, spec_for(sqlite_url, source="nope"))
    with pytest.raises(BadRequest, match=r"text column 'txt' is not in table 'docs' \(columns: id, body\)"):
        db.inspect_run(engine, spec_for(sqlite_url, text_column="txt"))
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE docs ADD COLUMN weight REAL"))
    with pytest.raises(BadRequest, match="id column 'weight' is REAL; runs need an integer, text or UUID id column"):
        db.inspect_run(engine, spec_for(sqlite_url, id_column="weight"))


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_target_in_a_schema_that_does_not_exist_is_named_before_the_run(dialect, sqlite_url, request):
    """The run was recorded and failed on its CREATE with "unknown database my" (SQLite) or "schema "my" does not
    exist" (PostgreSQL)."""
    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    engine = db.engine_for(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE IF EXISTS docs"))
    make_source(url, rows=[(1, "a")])
    default = "main" if dialect == "sqlite" else "public"
    # (Other tests may have added schemas to the session's PostgreSQL.)
    with pytest.raises(BadRequest, match=rf"^target table 'my.docs_emb': schema 'my' does not exist \(schemas: "
                                         rf"{default}(, \w+)*\); a name with a dot is read as schema\.table$"):
        db.inspect_run(engine, spec_for(url, target="my.docs_emb"))
    assert db.inspect_run(engine, spec_for(url, target=f"{default}.docs_emb")).target is None  # one that exists


def test_one_active_run_per_target_holds_for_a_new_target_typed_in_two_cases(sqlite_url, pg_url, home):
    """`NEW_EMB` and `new_emb`, neither there yet, are one table to SQLite and SQL Server: two runs into them at once
    both ran (5,968 and 6,000 rows into one table). PostgreSQL keeps them apart, and so does the key."""
    from jobs.core.errors import Conflict
    from jobs.store.registry import Registry

    registry = Registry()

    def record(url, target):
        return registry.create("{}", "test", "docs", target, "m", "local[1]", target_key=db.target_key(url, target))

    recorded = [record(sqlite_url, "NEW_EMB")]
    with pytest.raises(Conflict):
        record(sqlite_url, "new_emb")
    assert db.target_key("mssql+pyodbc://u:pw@h/db", "Sales.NEW") == db.target_key("mssql+pyodbc://u:pw@h/db",
                                                                                    "sales.new")
    assert ":pw@" not in db.target_key("mssql+pyodbc://u:pw@h/db", "t")
    recorded += [record(pg_url, "NEW_EMB"), record(pg_url, "new_emb")]  # two tables there
    for run_id in recorded:  # ended, so they pace no later test's pages
        registry.finish(run_id, "cancelled")


def test_names_in_another_case_resolve_to_the_one_table_or_column_the_catalog_has(pg_url):
    """On PostgreSQL, too, `GADGETS` finds the one table "Gadgets" and `id` the column "Id" (each spelled as the
    catalog does in the spec a run records); where two differ only in case, the exact name wins, and a third
    spelling guesses neither."""
    engine = db.engine_for(pg_url)
    with engine.begin() as conn:
        for name in ("Gadgets", "gadgets", "Widgets", "widgets_emb"):
            conn.execute(sa.text(f'DROP TABLE IF EXISTS "{name}"'))
        conn.execute(sa.text('CREATE TABLE "Widgets" ("Id" integer PRIMARY KEY, "Body" text)'))
    spec = spec_for(pg_url, source="public.WIDGETS", id_column="id", text_column="BODY", target="PUBLIC.widgets_emb")
    tables = db.inspect_run(engine, spec)
    recorded = db.spelled_as_catalog(spec, tables)
    assert (recorded.source, recorded.id_column, recorded.text_column, recorded.target) == \
        ("Widgets", "Id", "Body", "widgets_emb")  # the default schema's tables as list_tables names them
    db.ensure_target(engine, recorded, tables, 384)
    db.record_target(engine, recorded)
    # The target now exists: a run naming it in capitals is the same run to it.
    again = db.spelled_as_catalog(spec, db.inspect_run(engine, replace(spec, target="WIDGETS_EMB")))
    assert again == recorded
    # A target recorded before runs were spelled so (`public.widgets`, `ID`) takes the same run too.
    db.record_target(engine, replace(recorded, source="public.widgets", id_column="ID"))
    assert db.inspect_run(engine, recorded).target is not None
    with engine.begin() as conn:
        for name in ("Gadgets", "gadgets"):
            conn.execute(sa.text(f'CREATE TABLE "{name}" (id integer PRIMARY KEY, body text)'))
    assert db.reflect(engine, "Gadgets").name == "Gadgets" and db.reflect(engine, "gadgets").name == "gadgets"
    with pytest.raises(BadRequest, match=r"source table 'GADGETS' does not exist \(tables: .*Gadgets, .*gadgets"):
        db.reflect(engine, "GADGETS", "source")


@pytest.mark.parametrize("name", ['my table', 'we"ird', "semi;colon", "x'); DROP TABLE docs; --"])
def test_hostile_names_are_quoted_never_executed(sqlite_url, name):
    make_source(sqlite_url, rows=[(1, "a")])
    make_source(sqlite_url, name=name, id_col=f"{name} id", text_col=f"{name} text", rows=[(1, "b")])
    engine = db.engine_for(sqlite_url)
    s = spec_for(sqlite_url, source=name, id_column=f"{name} id", text_column=f"{name} text",
                 target=f"{name} emb")
    tables = db.inspect_run(engine, s)
    target = db.ensure_target(engine, s, tables, 384)
    with engine.connect() as conn:
        rows = conn.execute(db.chunk_query(tables.source, tables.id_col, tables.text_col, target,
                                           None, False, 10, 5, engine.dialect.name)).all()
    assert [tuple(r) for r in rows] == [(1, "b", None, None)]
    assert set(db.list_tables(engine)) >= {"docs", name, f"{name} emb"}


def test_incompatible_target_says_what_differs(sqlite_url):
    make_source(sqlite_url)
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text('CREATE TABLE docs_emb (source_id INTEGER, embedding TEXT, model TEXT)'))
    with pytest.raises(BadRequest) as err:
        db.inspect_run(engine, spec_for(sqlite_url))
    msg = str(err.value)
    assert "'content_hash' is missing" in msg and "'embedded_at' is missing" in msg
    assert "'embedding' is TEXT" in msg and "'source_id' is not the primary key" in msg


def test_a_target_holds_the_vectors_of_one_table_by_one_id_column(sqlite_url):
    """A run from another table into a target mixed two tables' rows under one id, and search showed the new
    table's text beside the old one's vectors."""
    engine = db.engine_for(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE docs (id INTEGER PRIMARY KEY, alt_id INTEGER UNIQUE, body TEXT)"))
    make_source(sqlite_url, name="notes", id_col="id", text_col="body", rows=[(1, "b")])
    first = spec_for(sqlite_url)
    target = db.ensure_target(engine, first, db.inspect_run(engine, first), 384)
    db.record_target(engine, first)
    # Bound by a run that wrote nothing (one that failed in planning, on a repeated id), the empty target had
    # refused every other source for good.
    assert db.inspect_run(engine, spec_for(sqlite_url, source="notes")).target is not None
    with engine.begin() as conn:
        conn.execute(target.insert(), [{"source_id": 1, "embedding": b"\0" * 1536, "model": "m", "content_hash": "h",
                                        "embedded_at": db.utcnow()}])
    with pytest.raises(BadRequest, match="target table 'docs_emb' holds the vectors of 'docs' by id column 'id', "
                                         "not of 'notes' by 'id': pick another target"):
        db.inspect_run(engine, spec_for(sqlite_url, source="notes"))
    with pytest.raises(BadRequest, match="not of 'docs' by 'alt_id'"):
        db.inspect_run(engine, spec_for(sqlite_url, id_column="alt_id"))
    db.inspect_run(engine, spec_for(sqlite_url, source="notes", target="notes_emb"))
    db.inspect_run(engine, first)  # its own table again, any text column: changed texts are embedded again


def test_wrong_password_message_has_no_password(pg_url):
    bad = pg_url.replace("s3cret-pg", "wrong-Pa55word")
    with pytest.raises(Unavailable) as err:
        db.check_connection(bad)
    msg = str(err.value)
    assert "wrong-Pa55word" not in msg and "***" in msg
    assert "password authentication failed" in msg


def test_upsert_is_idempotent_on_sqlite_and_postgres(sqlite_url, pg_url):
    for url in (sqlite_url, pg_url):
        engine = db.engine_for(url)
        target = db.target_table("emb_upsert", sa.Integer(), db.vector_type_for(engine.dialect.name, 4))
        target.metadata.drop_all(engine)
        target.metadata.create_all(engine)
        v = np.arange(4, dtype=np.float32)
        row = dict(source_id=1, embedding=db.encode_for(target, v), model="m", content_hash="h",
                   embedded_at=dt.datetime(2026, 1, 1))
        with engine.begin() as conn:
            db.upsert(conn, target, [row, {**row, "source_id": 2}])
        with engine.begin() as conn:
            db.upsert(conn, target, [{**row, "content_hash": "h2", "embedding": db.encode_for(target, v + 1)}])
        with engine.connect() as conn:
            got = conn.execute(sa.select(target).order_by(target.c.source_id)).all()
        assert [(r.source_id, r.content_hash) for r in got] == [(1, "h2"), (2, "h")]
        assert np.array_equal(np.frombuffer(got[0].embedding, "<f4"), v + 1)


def test_vectors_are_deleted_in_statements_sql_server_can_take(sqlite_url):
    engine = db.engine_for(sqlite_url)
    target = db.target_table("emb_many", sa.Integer(), db.vector_type_for("sqlite", 4))
    target.metadata.create_all(engine)
    v = np.zeros(4, dtype=np.float32)
    with engine.begin() as conn:
        db.upsert(conn, target, [{"source_id": i, "embedding": db.encode_for(target, v), "model": "m",
                                  "content_hash": "h", "embedded_at": db.utcnow()} for i in range(3000)])
    statements = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cur, sql, params, *_: statements.append(params))
    with engine.begin() as conn:
        assert db.delete_vectors(conn, target, list(range(2500))) == 2500
    assert [len(p) for p in statements] == [1000, 1000, 500]  # SQL Server refuses more than 2,100 parameters


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_key_columns_are_the_ones_the_catalog_declares_unique_alone(dialect, sqlite_url, request):
    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    engine = db.engine_for(url)
    with engine.begin() as conn:
        for name in ("keyed", "pair"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        conn.execute(sa.text("CREATE TABLE keyed (a INTEGER, b INTEGER PRIMARY KEY, c INTEGER UNIQUE, d INTEGER, "
                             "e INTEGER, f INTEGER, UNIQUE (e, f))"))
        conn.execute(sa.text("CREATE UNIQUE INDEX keyed_d ON keyed (d)"))
        conn.execute(sa.text("CREATE TABLE pair (x INTEGER, y INTEGER, PRIMARY KEY (x, y))"))
    assert db.key_columns(engine, db.reflect(engine, "keyed")) == ["b", "c", "d"]
    assert db.key_columns(engine, db.reflect(engine, "pair")) == []


def test_a_process_that_loses_the_race_for_every_table_of_a_schema_goes_on(sqlite_url):
    """Two `cluster scale 2` at once on a fresh home: the other process made one table after another of the scaling
    schema between this one's checks and CREATEs, and a second attempt lost the race for the next table too
    ("table … already exists"). Here the other process wins the race for each of three tables."""
    from jobs.store.db import create_missing

    mine, theirs = sa.MetaData(), sa.MetaData()
    for name in ("raced_a", "raced_b", "raced_c"):
        sa.Table(name, mine, sa.Column("id", sa.Integer, primary_key=True))
        sa.Table(name, theirs, sa.Column("id", sa.Integer, primary_key=True))
    engine, other = db.engine_for(sqlite_url), sa.create_engine(sqlite_url)

    def other_wins(table, connection, **_):
        theirs.tables[table.name].create(other, checkfirst=True)

    for table in mine.tables.values():
        sa.event.listen(table, "before_create", other_wins)
    try:
        create_missing(engine, mine)
    finally:
        other.dispose()
    assert set(sa.inspect(engine).get_table_names()) >= {"raced_a", "raced_b", "raced_c"}


def _open_at(url: str, start: float) -> str:
    """Connect through the product's engine at the given moment; what went wrong, or ''."""
    while time.time() < start:  # spun, not slept: a sleep's wake-up spreads the four apart and hides the race
        pass
    try:
        with db.engine_for(url).connect() as conn:
            conn.execute(sa.text("SELECT count(*) FROM sqlite_master"))
        return ""
    except sa.exc.OperationalError as exc:
        return str(exc.orig)


def test_processes_opening_a_sqlite_file_at_once_all_connect(tmp_path):
    """SQLite answers "database is locked" at once, ignoring its busy timeout, to a connection switching a file to
    WAL while another does: two `cluster scale 2` at once failed so on the run registry, and a file made by another
    tool (in SQLite's default journal mode) failed whichever process opened it second."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    for attempt in range(4):
        path = tmp_path / f"theirs{attempt}.sqlite"
        with sqlite3.connect(path) as conn:  # as another tool leaves a file: SQLite's default rollback journal
            conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY)")
        start = time.time() + 0.5
        with fork.Pool(4) as pool:
            errors = pool.starmap(_open_at, [(f"sqlite:///{path}", start)] * 4)
        assert errors == [""] * 4, errors
        with contextlib.closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_run_starting_while_another_creates_the_same_tables_goes_on(dialect, sqlite_url, request):
    """Two runs started at once on one database: the other made embeddeck_targets between this one's check and
    its CREATE, which failed the run with "table embeddeck_targets already exists". The other run is a second
    engine, acting from inside SQLAlchemy's own before_create event."""
    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    engine, other, made = db.engine_for(url), sa.create_engine(url), []
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {db.targets_table.name}"))

    def other_run_wins(table, connection, **_):
        if not made:
            db.targets_table.to_metadata(sa.MetaData()).create(other)
            made.append(table.name)

    sa.event.listen(db.targets_table, "before_create", other_run_wins)
    try:
        db.record_target(engine, spec_for(url, target="raced_emb"))
    finally:
        sa.event.remove(db.targets_table, "before_create", other_run_wins)
        other.dispose()
    assert made == [db.targets_table.name]
    assert db.target_origin(engine, "raced_emb")["source"] == "docs"


def compile_mssql(stmt):
    """What pyodbc receives: qmark parameters (as a pyodbc engine compiles them), dialect quoting."""
    return str(stmt.compile(dialect=mssql_pyodbc.dialect(paramstyle="qmark")))


# Past the cut, in each unit a database may count in: characters, astral characters (2 UTF-16 units, 4
# UTF-8 bytes), bytes of 2-byte characters, bytes that are not UTF-8; and values that are not text.
LONG_VALUES = {1: "x" * 200_000, 2: "\U0001f642é" * 70_000, 3: None, 4: "short", 5: "  \x00 ", 6: 12345,
               7: "é".encode() * 100_000, 8: b"\xff\xfe" * 100_000 + "\U0001f642".encode() * 10, 9: "b", 10: "ab",
               # SQLite's text functions end a text at a NUL: the run embedded 'a chair' of these two
               11: "a chair\x00 with arms", 12: "é\x00" * 70_000}


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_chunk_reads_long_texts_cut_in_the_database_to_what_the_model_can_see(dialect, sqlite_url, request):
    """Each row arrives short enough to bound a task's memory, and normalises to the same text (so the same
    hash) as the whole value, read as the driver gives it, would."""
    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    engine = db.engine_for(url)
    # SQLite stores each value as it comes; PostgreSQL holds text (without NUL), bytes, enums and blank-padded
    # char(n) (whose padding a cast to text would drop) in columns of their own type.
    typed = {sa.Text: [1, 2, 3, 4], sa.LargeBinary: [7, 8], sa.Enum("a", "b", name="long_kind"): [9],
             sa.CHAR(8): [10]} if dialect == "postgresql" else {sa.Text: list(LONG_VALUES)}
    for n, (col_type, ids) in enumerate(typed.items()):
        source = sa.Table(f"long_{n}", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True),
                          sa.Column("body", col_type))
        source.drop(engine, checkfirst=True)
        source.create(engine)
        with engine.begin() as conn:
            conn.execute(source.insert(), [{"id": i, "body": LONG_VALUES[i]} for i in ids])
        target = db.target_table(f"long_{n}_emb", sa.Integer(), db.vector_type_for(dialect, 4))
        target.metadata.drop_all(engine)
        target.metadata.create_all(engine)
        with engine.connect() as conn:
            rows = conn.execute(db.chunk_query(source, source.c.id, source.c.body, target, 0, True,
                                               len(LONG_VALUES), len(LONG_VALUES), dialect)).all()
            whole = dict(conn.execute(sa.select(source.c.id, source.c.body)).all())
        assert [r.id for r in rows] == ids
        for r in rows:
            assert normalize_text(r.text) == normalize_text(whole[r.id]), r.id
            if isinstance(r.text, str):  # one holding a NUL is cut by its bytes (at most 4 a character)
                assert len(r.text) <= (4 if "\x00" in r.text else 1) * MAX_TEXT_CHARS
            elif r.text is not None and not isinstance(r.text, int):
                assert len(bytes(r.text)) <= 4 * MAX_TEXT_CHARS


def test_search_hits_and_the_preview_carry_the_text_as_runs_embed_it(sqlite_url):
    """Decoded, normalised and cut like a run's text: never bytes (which the CLI's JSON cannot hold), never
    a whole 1 MB document per hit."""
    make_source(sqlite_url, rows=list(LONG_VALUES.items()))
    origin = {"source": "docs", "id_column": "id", "text_column": "body"}
    got = search.fetch_texts(db.engine_for(sqlite_url), origin, list(LONG_VALUES))
    assert got == {i: normalize_text(v) for i, v in LONG_VALUES.items()}
    assert got[1] == "x" * MAX_TEXT_CHARS and got[3] is None and "\ufffd" in got[8]
    source = db.reflect(db.engine_for(sqlite_url), "docs")  # the launch page's preview shows them so too
    assert db.texts(db.engine_for(sqlite_url), source, source.c.id, source.c.body, limit=3) == \
        {i: got[i] for i in (1, 2, 3)}


def test_search_answers_without_text_where_the_source_is_gone_or_altered(sqlite_url):
    """Search failed outright ("source table 'docs' does not exist") once the table a target was embedded from
    had been dropped; the stored vectors still answer, and the answer says why it carries no text."""
    make_source(sqlite_url, rows=[(1, "red boots"), (2, "blue tent")])
    engine = db.engine_for(sqlite_url)
    spec = spec_for(sqlite_url)
    target = db.ensure_target(engine, spec, db.inspect_run(engine, spec), 384)
    db.record_target(engine, spec)
    vecs = get_encoder(spec.model).encode(["red boots", "blue tent"])
    with engine.begin() as conn:
        db.upsert(conn, target, [{"source_id": i, "embedding": db.encode_for(target, v), "model": spec.model,
                                  "content_hash": "h", "embedded_at": db.utcnow()} for i, v in zip((1, 2), vecs)])
    assert [(h.id, h.text) for h in search.search(sqlite_url, "docs_emb", "boots", k=1).hits] == [(1, "red boots")]
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE docs RENAME COLUMN body TO descr"))
    altered = search.search(sqlite_url, "docs_emb", "boots", k=1)
    assert [(h.id, h.text) for h in altered.hits] == [(1, None)]
    assert altered.warnings == ["hits come without text: text column 'body' is not in table 'docs' (columns: id, "
                                "descr)"]
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE docs"))
    gone = search.search(sqlite_url, "docs_emb", "tent", k=1)
    assert [h.id for h in gone.hits] == [2] and gone.warnings[0].startswith(
        "hits come without text: source table 'docs' does not exist")


def test_a_target_name_near_the_database_s_limit_runs_and_one_beyond_it_is_refused_before_the_run(pg_url):
    """PostgreSQL names hold 63 bytes: a 60-character target failed its run on the index named after it
    (`ix_<target>_embedded_at`, 75), and a 71-character one was recorded and failed on its CREATE."""
    engine = db.engine_for(pg_url)
    make_source(pg_url, name="long_src", rows=[(1, "a")])
    near, beyond = "t" * 59 + "_emb", "t" * 67 + "_emb"
    for name in (near, "u" * 59 + "_emb"):  # two that differ only past the index's cut
        spec = spec_for(pg_url, source="long_src", target=name)
        target = db.ensure_target(engine, spec, db.inspect_run(engine, spec), 384)
        assert [len(ix["name"]) <= 63 for ix in sa.inspect(engine).get_indexes(name)] == [True], target
    assert db.inspect_run(engine, spec_for(pg_url, source="long_src", target=near)).target is not None
    with pytest.raises(BadRequest, match=rf"^target table name '{beyond}' is 71 bytes long; postgresql holds names "
                                         r"of at most 63: pick a shorter one$"):
        db.inspect_run(engine, spec_for(pg_url, source="long_src", target=beyond))
    index = CreateIndex(next(iter(db.target_table("x" * 126, sa.Integer(), sa.LargeBinary()).indexes)))
    assert len(str(index.compile(dialect=mssql.dialect())).split()[2]) <= 128  # SQL Server's limit


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_an_existing_target_keyed_by_another_kind_than_the_id_column_is_refused_before_the_run(dialect, sqlite_url,
                                                                                             request):
    """A target made by hand with an integer source_id, for a source keyed by text, was taken, and the run's first
    write failed with "datatype mismatch" (SQLite) or "operator does not exist: integer = character varying"."""
    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    engine = db.engine_for(url)
    with engine.begin() as conn:
        for name in ("skus", "by_hand_emb", "by_text_emb"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        conn.execute(sa.text("CREATE TABLE skus (sku VARCHAR(20) PRIMARY KEY, body TEXT)"))
    db.create_missing(engine, db.target_table("by_hand_emb", sa.Integer(), db.vector_type_for(dialect, 384)).metadata)
    spec = spec_for(url, source="skus", id_column="sku", target="by_hand_emb")
    with pytest.raises(BadRequest, match=r"^existing target table 'by_hand_emb' keys its vectors by source_id "
                                         r"INTEGER, and id column 'sku' is VARCHAR\(20\): pick a target keyed by "
                                         r"text, or a new one$"):
        db.inspect_run(engine, spec)
    db.create_missing(engine, db.target_table("by_text_emb", sa.String(40), db.vector_type_for(dialect, 384)).metadata)
    assert db.inspect_run(engine, replace(spec, target="by_text_emb")).target is not None  # a text key of any length


def test_mssql_target_ddl_varbinary_and_vector():
    ddl = str(CreateTable(db.target_table("emb", sa.BigInteger(), db.vector_type_for("mssql", 384)))
              .compile(dialect=mssql.dialect()))
    assert "embedding VARBINARY(8000) NOT NULL" in ddl
    assert "source_id BIGINT NOT NULL" in ddl and "PRIMARY KEY (source_id)" in ddl
    assert "content_hash VARCHAR(64) NOT NULL" in ddl and "embedded_at DATETIME NOT NULL" in ddl
    native = str(CreateTable(db.target_table("emb", sa.BigInteger(), db.vector_type_for("mssql", 384, True)))
                 .compile(dialect=mssql.dialect()))
    assert "embedding VECTOR(384) NOT NULL" in native
    for key_type, column in [(mssql.UNIQUEIDENTIFIER(), "source_id UNIQUEIDENTIFIER NOT NULL"),
                             (mssql.NVARCHAR(40, collation="Latin1_General_CI_AS"),
                              "source_id NVARCHAR(40) COLLATE Latin1_General_CI_AS NOT NULL")]:
        keyed = str(CreateTable(db.target_table("emb", key_type, db.vector_type_for("mssql", 384)))
                    .compile(dialect=mssql.dialect()))
        assert column in keyed and "PRIMARY KEY (source_id)" in keyed  # the source's type, collation and all


@pytest.mark.parametrize("version,edition,native", [
    ((17, 0, 1000), 3, True),  # SQL Server 2025
    ((16, 0, 4135), 3, False),  # SQL Server 2022: VARBINARY(8000)
    ((12, 0, 2000), 5, True),  # Azure SQL Database reports 12 and has VECTOR
    ((15, 0, 2000), 8, False),  # Azure SQL Managed Instance (2019 line)
])
def test_new_sql_server_targets_use_vector_where_the_server_has_it(version, edition, native):
    assert db.native_vectors_supported(version, edition) is native
    compiled = str(sa.schema.CreateTable(db.target_table("t", sa.Integer(), db.vector_type_for("mssql", 384, native)))
                   .compile(dialect=mssql.dialect()))
    assert ("VECTOR(384)" in compiled) is native and ("VARBINARY(8000)" in compiled) is not native


def test_mssql_upsert_is_a_holdlock_merge_with_quoted_names():
    target = db.target_table("my emb]x", sa.BigInteger(), db.vector_type_for("mssql", 384), schema="dbo")
    sql = compile_mssql(db.upsert_statement(target, "mssql"))
    assert sql.startswith("MERGE INTO dbo.[my emb]]x] WITH (HOLDLOCK) AS tgt USING (SELECT ? AS source_id, ")
    assert "ON tgt.source_id = src.source_id" in sql
    assert "WHEN MATCHED THEN UPDATE SET tgt.embedding = src.embedding, tgt.model = src.model" in sql
    assert sql.endswith("WHEN NOT MATCHED THEN INSERT (source_id, embedding, model, content_hash, embedded_at) "
                        "VALUES (src.source_id, src.embedding, src.model, src.content_hash, src.embedded_at);")
    assert sql.count("?") == 5
    native = compile_mssql(db.upsert_statement(target, "mssql", native_dim=384))
    assert "CAST(? AS VECTOR(384)) AS embedding" in native


def test_mssql_range_read_and_search_statements():
    src = sa.Table("Product Descriptions", sa.MetaData(), sa.Column("ProductID", sa.Integer),
                   sa.Column("Text", sa.UnicodeText), schema="dbo")
    target = db.target_table("emb", sa.Integer(), db.vector_type_for("mssql", 384))
    sql = compile_mssql(db.chunk_query(src, src.c.ProductID, src.c.Text, target, 17, False, 1000, 256, "mssql"))
    assert sql.startswith("SELECT TOP __[POSTCOMPILE_param_1] dbo.[Product Descriptions].[ProductID] AS id")
    assert "LEFT OUTER JOIN emb ON emb.source_id = dbo.[Product Descriptions].[ProductID]" in sql
    assert "WHERE dbo.[Product Descriptions].[ProductID] <= ? AND dbo.[Product Descriptions].[ProductID] > ? " in sql
    assert sql.endswith("ORDER BY dbo.[Product Descriptions].[ProductID]")
    assert " ".join(compile_mssql(db.orphans_delete(src.c.ProductID, target)).split()) == (
        "DELETE FROM emb WHERE NOT (EXISTS (SELECT * FROM dbo.[Product Descriptions] "
        "WHERE dbo.[Product Descriptions].[ProductID] = emb.source_id))")
    # Where the key ranges end: the first rows in id order, numbered (SQL Server takes ORDER BY in a derived table
    # only with TOP).
    cuts = " ".join(compile_mssql(db.ids_at_query(src, src.c.ProductID, [0, 499, 999])).split())
    assert ("FROM (SELECT anon_2.id AS id, row_number() OVER (ORDER BY anon_2.id) - ? AS pos FROM (SELECT TOP "
            "__[POSTCOMPILE_param_2] dbo.[Product Descriptions].[ProductID] AS id FROM dbo.[Product Descriptions] "
            "WHERE dbo.[Product Descriptions].[ProductID] IS NOT NULL ORDER BY dbo.[Product Descriptions].[ProductID]"
            ") AS anon_2) AS anon_1 WHERE anon_1.pos IN (__[POSTCOMPILE_pos_1])") in cuts
    # The text is cut in the server, one UTF-16 unit short where the cut would split a surrogate pair.
    cut = "substring(dbo.[Product Descriptions].[Text], ?, ?)"
    assert (f"CASE WHEN (unicode({cut}) BETWEEN ? AND ?) THEN {cut} ELSE {cut} END AS text") in sql
    s = compile_mssql(search.mssql_search_statement(target, 384, 10))
    assert s == ("SELECT TOP (10) source_id AS source_id, VECTOR_DISTANCE('cosine', embedding, "
                 "CAST(? AS VECTOR(384))) AS distance FROM emb ORDER BY distance")


@pytest.mark.parametrize(("col_type", "dialect", "problem"), [
    (sa.BigInteger(), "mssql", None), (sa.Numeric(10, 0), "postgresql", None),
    (mssql.UNIQUEIDENTIFIER(), "mssql", None), (postgresql.UUID(), "postgresql", None),
    (mssql.NVARCHAR(450), "mssql", None), (mssql.VARCHAR(900), "mssql", None), (sa.Text(), "postgresql", None),
    (mssql.NVARCHAR(451), "mssql", "is NVARCHAR(451), which SQL Server cannot key a target by"),
    (mssql.NVARCHAR(), "mssql", "at most 900 bytes"),  # NVARCHAR(max), as reflected
    (sa.Float(), "sqlite", "is FLOAT; runs need an integer, text or UUID id column"),
    (sa.Enum("a", "b", name="kind"), "postgresql", "runs need an integer, text or UUID"),
])
def test_id_columns_runs_can_key_a_target_by(col_type, dialect, problem):
    found = db.key_type_problem("id", col_type, dialect)
    assert (found is None) if problem is None else (problem in found), found


def test_the_pages_list_the_schemas_that_hold_users_tables():
    """What get_schema_names answers on a new SQL Server database (dbo the user's default), and on PostgreSQL."""
    mssql_names = ["db_accessadmin", "db_backupoperator", "db_datareader", "db_datawriter", "db_ddladmin",
                   "db_denydatareader", "db_denydatawriter", "db_owner", "db_securityadmin", "dbo", "guest",
                   "INFORMATION_SCHEMA", "sales", "sys", "hr"]
    assert db.user_schemas(mssql_names, "dbo") == [None, "hr", "sales"]
    assert db.user_schemas(["information_schema", "pg_toast", "public", "sales"], "public") == [None, "sales"]


def test_mssql_engine_uses_fast_executemany_only_with_microsoft_driver():
    ms = db.engine_for("mssql+pyodbc://u:p@h:1433/d?driver=ODBC+Driver+18+for+SQL+Server")
    tds = db.engine_for("mssql+pyodbc://u:p@h:1433/d?driver=FreeTDS&TDS_Version=7.4")
    assert ms.dialect.fast_executemany is True
    assert tds.dialect.fast_executemany is False


def test_hits_carry_numbers_as_numbers_and_other_keys_as_text():
    """A target made by hand may key by NUMERIC(18, 0), which drivers return as Decimal: still a number in JSON."""
    import uuid
    from decimal import Decimal

    key = uuid.UUID(int=7)
    assert [search.shown_id(k) for k in (5, Decimal("123"), "KY-01", key)] == [5, 123, "KY-01", str(key)]
    assert search.shown_id(Decimal("1.5")) == "1.5"


KEYS = {"integer": (sa.Integer(), int), "text": (sa.String(20), lambda i: f"sku-{i:05d}")}


@pytest.mark.parametrize("kind", KEYS)
def test_vector_index_follows_inserts_updates_and_deletes(sqlite_url, kind):
    """The in-memory index gives the same top-k as a streaming scan as the table changes under it, for integer
    and text keys."""
    id_type, key = KEYS[kind]
    engine = db.engine_for(sqlite_url)
    target = db.target_table("idx_emb", id_type, sa.LargeBinary())
    target.metadata.create_all(engine)
    rng = np.random.default_rng(1)

    def write(ids, seconds):
        rows = [dict(source_id=key(i), embedding=db.encode_for(target, rng.standard_normal(8)), model="m",
                     content_hash="h", embedded_at=dt.datetime(2026, 1, 1, 0, 0, seconds)) for i in ids]
        with engine.begin() as conn:
            db.upsert(conn, target, rows)

    index = search.VectorIndex(engine, target, 8)
    index.count_every_s = 0  # count at every query: a delete shows at once (it waits up to 2 s otherwise)
    q = rng.standard_normal(8).astype(np.float32)
    for step, change in enumerate([lambda: write(range(50), 1), lambda: write(range(50, 80), 2),
                                   lambda: write([3, 60], 3)]):
        change()
        got = index.top_k(q, 5)
        want = search.scan_top_k(engine, target, q / np.linalg.norm(q), 5, chunk_rows=7)
        assert list(got[1]) == list(want[1]), step
        assert np.allclose(got[0], want[0], atol=1e-6)
    assert len(index.ids) == 80 and index.ids.dtype == (np.int64 if kind == "integer" else object)
    with engine.begin() as conn:
        conn.execute(target.delete().where(target.c.source_id < key(40)))
    got = index.top_k(q, 5)
    assert len(index.ids) == 40 and min(got[1]) >= key(40)


def test_threads_searching_one_target_at_once_load_it_once_and_agree(sqlite_url):
    """The API's and the dashboard's threads: each once saw an empty index and loaded the table for itself."""
    from concurrent.futures import ThreadPoolExecutor

    engine = db.engine_for(sqlite_url)
    target = db.target_table("shared_emb", sa.Integer(), sa.LargeBinary())
    target.metadata.create_all(engine)
    rng = np.random.default_rng(3)
    with engine.begin() as conn:
        db.upsert(conn, target, [dict(source_id=i, embedding=db.encode_for(target, rng.standard_normal(16)),
                                      model="m", content_hash="h", embedded_at=dt.datetime(2026, 1, 1))
                                 for i in range(20_000)])
    loads = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def count_loads(conn, cursor, statement, *_):
        if "SELECT shared_emb.source_id, shared_emb.embedding, shared_emb.embedded_at" in statement:
            loads.append(statement)

    q = rng.standard_normal(16).astype(np.float32)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: search.index_for(sqlite_url, engine, target, 16).top_k(q, 5), range(8)))
    want = search.scan_top_k(engine, target, q / np.linalg.norm(q), 5)
    assert all(list(ids) == list(want[1]) for _, ids in got)
    assert len(loads) == 1, loads


def test_vector_index_over_its_cap_holds_nothing(sqlite_url, monkeypatch):
    engine = db.engine_for(sqlite_url)
    target = db.target_table("cap_emb", sa.Integer(), sa.LargeBinary())
    target.metadata.create_all(engine)
    with engine.begin() as conn:
        db.upsert(conn, target, [dict(source_id=i, embedding=np.ones(384, "<f4").tobytes(), model="m",
                                      content_hash="h", embedded_at=dt.datetime(2026, 1, 1)) for i in range(10)])
    monkeypatch.setenv("EMBEDDECK_SEARCH_CACHE_MB", str(5 * 384 * 4 / 2**20))  # room for 5 vectors
    index = search.VectorIndex(engine, target, 384)
    assert index.top_k(np.ones(384, np.float32), 3) is None and len(index.ids) == 0


def test_registry_written_by_an_older_version_gains_new_columns(tmp_path):
    """An older EmbedDeck's registry: its runs table without the newest columns, and named without the prefix."""
    from jobs.store import registry as runs

    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    old = sa.MetaData()
    older_runs = sa.Table("runs", old, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                         for c in runs.runs_table.columns
                                         if c.name not in ("timings", "rows_removed", "executors", "driver_identity")])
    old.create_all(db.engine_for(url))
    with db.engine_for(url).begin() as conn:
        conn.execute(older_runs.insert().values(run_id="r-old", state="succeeded", cancel_requested=False,
                                                spec_json="{}", launched_by="cli", created_at=db.utcnow(),
                                                rows_done=7, rows_skipped=0, rows_per_s=1.0))
    registry = runs.Registry(url)
    assert registry.get("r-old").rows_done == 7  # the history an older version kept
    run_id = registry.create("{}", "test", "s", "t", "m", "local[1]")
    registry.set_executors(run_id, 0)
    assert registry.get(run_id).executors == 0
    registry.set_timings(run_id, {"first_commit": 1.23456})
    registry.finish(run_id, "succeeded", rows_removed=3)
    assert registry.get(run_id).as_dict()["timings"] == {"first_commit": 1.235}
    assert registry.get(run_id).rows_removed == 3
    # SQL Server's ALTER TABLE has no COLUMN keyword: the registry of an ACA deployment may be there.
    removed = runs.runs_table.c.rows_removed
    assert runs.add_column_ddl(removed, mssql.dialect()) == "ALTER TABLE embeddeck_runs ADD rows_removed INTEGER"
    assert runs.add_column_ddl(removed, postgresql.dialect()) == ("ALTER TABLE embeddeck_runs ADD COLUMN rows_removed "
                                                                 "INTEGER")
    assert db.rename_table_ddl("runs", "embeddeck_runs", mssql.dialect()) == "EXEC sp_rename N'runs', N'embeddeck_runs'"
    assert db.rename_table_ddl("runs", "embeddeck_runs", postgresql.dialect()) == ("ALTER TABLE runs RENAME TO "
                                                                                   "embeddeck_runs")
    assert sa.inspect(registry.engine).get_table_names() == ["embeddeck_run_progress", "embeddeck_run_slots",
                                                             "embeddeck_runs"]


def fresh_pg_database(request, prefix: str) -> str:
    """The URL of a new database on the tests' PostgreSQL server: one that no other test's tables are in."""
    import uuid

    server = sa.engine.make_url(request.getfixturevalue("pg_url"))
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with db.engine_for(server.render_as_string(hide_password=False)).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text(f"CREATE DATABASE {name}"))
    return server.set(database=name).render_as_string(hide_password=False)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_registry_keeps_to_its_own_tables_in_a_shared_database(dialect, tmp_path, request):
    """On ACA the registry is the run's SQL database. A users' `runs` table there was taken for the registry's own:
    its 29 columns added to it, then a traceback. EmbedDeck's tables now carry its prefix; an older EmbedDeck's are
    renamed to theirs, and a users' table of an old name stays as it was."""
    from jobs.store import scaling
    from jobs.store.registry import Registry

    url = f"sqlite:///{tmp_path / 'shared.sqlite'}" if dialect == "sqlite" else fresh_pg_database(request, "shared")
    engine = db.engine_for(url)
    users, older = sa.MetaData(), sa.MetaData()
    users_runs = sa.Table("runs", users, sa.Column("id", sa.Integer, primary_key=True),
                          sa.Column("athlete", sa.String(40), nullable=False), sa.Column("km", sa.Float))
    sa.Table("worker_samples", users, sa.Column("batch", sa.String(20), primary_key=True))
    for table in (scaling.events_table, scaling.settings_table):  # as an older EmbedDeck made them
        table.to_metadata(older, name=table.name.removeprefix("embeddeck_"))
    users.create_all(engine)
    older.create_all(engine)
    with engine.begin() as conn:
        conn.execute(users_runs.insert().values(id=1, athlete="ana", km=5.2))
        conn.execute(older.tables["scale_events"].insert().values(at=db.utcnow(), from_workers=0, to_workers=3,
                                                                  reason="backlog", source="autoscaler"))
        conn.execute(older.tables["scaling_settings"].insert().values(
            id=1, settings_json=json.dumps({"max_workers": 3}), updated_at=db.utcnow()))

    def columns() -> dict:
        inspector = sa.inspect(engine)
        return {name: [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(name)]
                for name in ("runs", "worker_samples")}

    users_columns = columns()

    registry = Registry(url)
    run_id = registry.create("{}", "test", "s", "t", "m", "local[1]")
    history = scaling.ScaleHistory(registry)
    history.sample(3, 3)
    assert [r.run_id for r in registry.list()] == [run_id]
    assert [e["reason"] for e in history.events()] == ["backlog"] and scaling.load_settings(registry).max_workers == 3
    assert columns() == users_columns
    with engine.connect() as conn:
        assert conn.execute(sa.select(users_runs)).all() == [(1, "ana", 5.2)]
    assert not {"scale_events", "scaling_settings"} & set(sa.inspect(engine).get_table_names())


def test_a_target_named_as_embeddecks_record_of_targets_is_refused(sqlite_url):
    """`--target embeddeck_targets` on a database without that record yet made it a vector table, and every later
    run there failed with "no such column: source"."""
    make_source(sqlite_url)
    spec = RunSpec(db_url=sqlite_url, source="docs", id_column="id", text_column="body", target="x")
    engine = db.engine_for(sqlite_url)
    for name in ("embeddeck_targets", "EMBEDDECK_TARGETS", "main.embeddeck_targets"):
        with pytest.raises(BadRequest, match="is where EmbedDeck records each target's source: pick another target"):
            db.inspect_run(engine, replace(spec, target=name))
    assert not sa.inspect(engine).has_table("embeddeck_targets")


def test_transient_database_errors_are_those_a_failover_or_restart_gives(sqlite_url):
    """Runs wait out (EMBEDDECK_DB_OUTAGE_S) what a database answers while it fails over, restarts or sheds load; any
    other error fails the run at once. Shapes as psycopg and pyodbc raise them."""
    import psycopg
    import pyodbc

    def error(orig, invalidated=False):
        return sa.exc.OperationalError("SELECT 1", {}, orig, connection_invalidated=invalidated)

    answering, silent = db.engine_for(sqlite_url), db.engine_for(f"postgresql+psycopg://u:p@127.0.0.1:{free_port()}/x")
    sqlserver = "[{}] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]{} ({}) (SQLExecDirectW)"
    away = [
        error(ValueError("server closed the connection unexpectedly"), invalidated=True),
        error(psycopg.errors.AdminShutdown("terminating connection due to administrator command")),
        error(pyodbc.OperationalError("08S01", sqlserver.format("08S01", "TCP Provider: Error code 0x68", 10054))),
        error(pyodbc.ProgrammingError("42000", sqlserver.format("42000", "Database 'shop' on server 'sql1' is not "
                                                                         "currently available.", 40613))),
        error(pyodbc.Error("40001", sqlserver.format("40001", "Transaction was deadlocked", 1205))),
    ]
    refused = [
        error(psycopg.errors.UniqueViolation("duplicate key value violates unique constraint")),
        error(pyodbc.ProgrammingError("22001", sqlserver.format("22001", "String or binary data would be truncated "
                                                                         "in VARCHAR(64)", 2628))),
        error(sqlite3.OperationalError("no such column: source")),
    ]
    assert [db.transient(exc, answering) for exc in away + refused] == [True] * len(away) + [False] * len(refused)
    assert db.transient(refused[0], silent)  # whatever it said, a database that does not answer now is away


def test_a_driver_elsewhere_is_taken_for_gone_half_a_minute_after_runs_stop_waiting_for_a_database(tmp_path,
                                                                                                   monkeypatch):
    """A driver waits out its database for EMBEDDECK_DB_OUTAGE_S (60 s), and on ACA the registry is that database: no
    heartbeat meanwhile. Readers on other hosts, who failed a run whose heartbeat was 60 s old, allow 30 s more."""
    from jobs.store import registry as runs

    registry = runs.Registry(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    run_id = registry.create("{}", "test", "s", "t", "m", "spark://controller:7077")
    now = db.utcnow()

    def gone(age_s: float) -> str | None:
        with registry.engine.begin() as conn:
            conn.execute(runs.runs_table.update().values(state="running", driver_pid=1, driver_host="replica-2",
                                                         heartbeat_at=now - dt.timedelta(seconds=age_s)))
        return runs.driver_gone_reason(registry.get(run_id), "replica-1", now)

    assert gone(85) is None and gone(95) == "no heartbeat from the driver on replica-2 for 90s"
    monkeypatch.setenv("EMBEDDECK_DB_OUTAGE_S", "0")
    assert gone(65) == "no heartbeat from the driver on replica-2 for 60s"


def test_a_step_of_the_wall_clock_leaves_drivers_and_daemons_alive(tmp_path):
    """A process was told apart from a later one of its pid by psutil's create_time, which counts from /proc/stat's
    boot time in whole seconds, and that moves with the wall clock: a step of 0.3 s made a reader fail every live
    driver as "killed or crashed", and `down` forget live daemons. The clock is stepped here across a second of
    that boot time and back at once, as NTP may step it, where this process may set the clock."""
    import socket

    import psutil

    from cluster.local import LocalCluster
    from jobs.core.processes import write_json
    from jobs.store import registry as runs

    registry = runs.Registry(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    driver, older_driver, master, older_master = (subprocess.Popen(["sleep", "60"]) for _ in range(4))
    try:
        run_id = registry.create("{}", "test", "s", "t", "m", "local[1]", target_key="k")
        registry.set_driver(run_id, driver.pid, "driver.log")
        older_run = registry.create("{}", "test", "s", "t2", "m", "local[1]", target_key="k2")
        with registry.engine.begin() as conn:  # as an older EmbedDeck recorded its driver
            conn.execute(runs.runs_table.update().where(runs.runs_table.c.run_id == older_run).values(
                driver_pid=older_driver.pid, driver_host=socket.gethostname(),
                driver_started=psutil.Process(older_driver.pid).create_time()))
        cluster, older_cluster = LocalCluster(home=tmp_path / "new"), LocalCluster(home=tmp_path / "old")
        cluster.adopt_master(master.pid)
        write_json(tmp_path / "old" / "cluster" / "master.json",  # an older EmbedDeck's state file
                   {"pid": older_master.pid, "started": psutil.Process(older_master.pid).create_time(),
                    "port": 7077, "webui_port": 8080, "log": ""})

        def alive() -> list:
            return [runs.driver_gone_reason(registry.get(run), socket.gethostname(), db.utcnow()) is None
                    for run in (run_id, older_run)] + [cluster.master_alive(), older_cluster.master_alive()]

        assert alive() == [True] * 4
        boot = time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_BOOTTIME)
        shift = 1.05 - boot % 1 if boot % 1 > 0.5 else -(boot % 1 + 0.05)  # across the boot time's next second
        btime = psutil.boot_time()
        now = time.clock_gettime(time.CLOCK_REALTIME)
        try:
            time.clock_settime(time.CLOCK_REALTIME, now + shift)
        except PermissionError:
            pytest.skip("stepping the wall clock needs CAP_SYS_TIME")
        try:
            moved, seen = psutil.boot_time() - btime, alive()
        finally:
            time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME) - shift)
        assert abs(moved) == 1  # what psutil's create_time moved by
        assert seen == [True] * 4
    finally:
        for proc in (driver, older_driver, master, older_master):
            proc.kill()
            proc.wait()
    assert not any(alive())


def test_a_run_started_again_after_a_lost_reply_keeps_its_first_start(tmp_path):
    """A driver repeats the start of its run when the database's reply was lost in a failover (the start may have
    committed): the run keeps the time it started embedding, and a run cancelled meanwhile is not started."""
    from jobs.store import registry as runs

    registry = runs.Registry(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    run_id = registry.create("{}", "test", "s", "t", "m", "local[1]")
    assert registry.start(run_id, 10, 2)
    first = registry.get(run_id)
    time.sleep(0.01)
    assert registry.start(run_id, 10, 2)
    again = registry.get(run_id)
    assert (again.state, again.started_at, again.rows_total, again.rows_skipped) == ("running", first.started_at, 10, 2)
    registry.finish(run_id, "cancelled", error="cancelled by request")
    assert not registry.start(run_id, 10, 2) and registry.get(run_id).state == "cancelled"


def test_a_deleted_registry_file_is_started_again_not_split(tmp_path):
    """A registry file deleted under a running API once left it writing the old file while new processes
    wrote a new one: every process now follows the file at the path."""
    from jobs.store.registry import Registry

    url = f"sqlite:///{tmp_path / 'reg.sqlite'}"
    api, other = Registry(url), Registry(url)
    api.create("{}", "test", "s", "t1", "m", "local[1]")
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"reg.sqlite{suffix}").unlink(missing_ok=True)
    assert api.list() == []
    run_id = api.create("{}", "test", "s", "t2", "m", "local[1]")
    assert [r.run_id for r in other.list()] == [run_id]  # both see the one file at the path


def test_search_indexes_share_one_memory_budget(sqlite_url, monkeypatch):
    """Each target searched once kept its own index of up to 1 GiB: together they now stay within the budget,
    the least recently used dropped first."""
    engine = db.engine_for(sqlite_url)
    for name in ("budget_a", "budget_b"):
        target = db.target_table(name, sa.Integer(), sa.LargeBinary())
        target.metadata.create_all(engine)
        with engine.begin() as conn:
            db.upsert(conn, target, [dict(source_id=i, embedding=np.ones(384, "<f4").tobytes(), model="m",
                                          content_hash="h", embedded_at=dt.datetime(2026, 1, 1)) for i in range(10)])
    monkeypatch.setenv("EMBEDDECK_SEARCH_CACHE_MB", str(15 * 384 * 4 / 2**20))  # room for 15 vectors: one index
    monkeypatch.setattr(search, "_INDEXES", type(search._INDEXES)())
    for name in ("budget_a", "budget_b"):
        table = db.reflect(engine, name)
        assert search.index_for(sqlite_url, engine, table, 384).top_k(np.ones(384, np.float32), 3) is not None
        search.trim_indexes()
    assert [key[1] for key in search._INDEXES] == ["budget_b"]


@pytest.mark.parametrize("kind", KEYS)
def test_a_large_target_is_searched_through_the_approximate_index_kept_current(sqlite_url, monkeypatch, kind):
    """Beyond EMBEDDECK_SEARCH_EXACT_ROWS the index is faiss IVF (8-bit): recall@10 against the exact scan
    stays high, and upserts and deletes reach it without a rebuild per query. Text keys get labels of their own."""
    id_type, key = KEYS[kind]
    monkeypatch.setenv("EMBEDDECK_SEARCH_EXACT_ROWS", "500")
    engine = db.engine_for(sqlite_url)
    target = db.target_table("ann_emb", id_type, sa.LargeBinary())
    target.metadata.create_all(engine)
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((40, 64)).astype(np.float32)

    def write(ids, second, vecs=None):
        vecs = centers[rng.integers(0, 40, len(ids))] + 0.3 * rng.standard_normal((len(ids), 64)) if vecs is None \
            else vecs
        with engine.begin() as conn:
            db.upsert(conn, target, [dict(source_id=key(i), embedding=db.encode_for(target, v), model="m",
                                          content_hash="h", embedded_at=dt.datetime(2026, 1, 1, 0, 0, second))
                                     for i, v in zip(ids, vecs)])

    write(range(3000), 1)
    index = search.VectorIndex(engine, target, 64)
    queries = centers[rng.integers(0, 40, 20)] + 0.3 * rng.standard_normal((20, 64))
    found = 0
    for q in queries.astype(np.float32):
        got = index.top_k(q, 10)
        want = search.scan_top_k(engine, target, q / np.linalg.norm(q), 10)
        found += len(set(got[1].tolist()) & set(want[1].tolist()))
    assert index.ann is not None and index.ann.ntotal == 3000 and len(index.ids) == 0
    assert found / 200 >= 0.9
    ann = index.ann
    probe = rng.standard_normal(64).astype(np.float32) * 10  # far from every cluster
    write([5], 2, [probe])  # an update of a row the index holds
    write([4000], 3, [-probe])  # a new row
    assert index.top_k(probe, 1)[1][0] == key(5) and index.top_k(-probe, 1)[1][0] == key(4000)
    assert index.ann is ann and ann.ntotal == 3001  # updated in place: no rebuild, no duplicate of row 5
    assert index.nbytes == 3001 * (64 + 8) + (3001 * search.KEY_BYTES if kind == "text" else 0)  # the cache counts keys
    index.count_every_s = 0  # deletes show at the next count
    with engine.begin() as conn:
        conn.execute(target.delete().where(target.c.source_id < key(2800)))
    got = index.top_k(probe, 3)  # 201 rows left: back under the line, searched exactly
    assert index.ann is None and len(index.ids) == 201 and key(5) not in got[1] and min(got[1]) >= key(2800)


def test_a_run_id_drawn_twice_takes_another_and_leaves_the_first_runs_url(tmp_path, monkeypatch):
    """A run id has 24 random bits a second. Drawn twice, the two launches shared the file that keeps a waiting
    run's URL, and the second, refused by the registry for the id, was told its target had an active run ("just
    started") and removed that file: the first run's start then failed ("its connection is gone"). A burst of six
    launches in CI once ended so, one run lost and one failed."""
    import uuid

    from jobs import lifecycle
    from jobs.store.registry import WAITING, Registry

    monkeypatch.setenv("EMBEDDECK_MAX_ACTIVE_RUNS", "1")
    registry = Registry(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    registry.create("{}", "test", "s", "busy", "m", "local[1]", target_key="busy")  # holds the one slot: none starts
    repeated, other = (f"r-20261202-000000-{uuid.uuid4().hex[:6]}" for _ in range(2))
    drawn = iter([repeated, repeated, other])
    monkeypatch.setattr(lifecycle, "new_run_id", lambda: next(drawn))
    url = f"sqlite:///{tmp_path / 'source.sqlite'}"
    recorded = [lifecycle.record(RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                                         target=target, master="local[1]", launched_by="test"), registry)
                for target in ("one_emb", "two_emb")]
    try:
        assert recorded == [repeated, other]
        assert [registry.get(run_id).phase for run_id in recorded] == [WAITING, WAITING]
        assert [lifecycle._waiting_url_path(run_id).read_text() for run_id in recorded] == [url, url]
    finally:
        for run_id in recorded:
            lifecycle.cancel(run_id, registry)
        lifecycle.refresh(registry)  # ends the waiting runs and removes their URLs
    assert not any(lifecycle._waiting_url_path(run_id).exists() for run_id in recorded)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_waiting_runs_are_taken_once_and_within_the_cap_by_callers_at_once(dialect, tmp_path, request):
    """Launchers and readers race to start waiting runs, from several processes or hosts: the registry lets each
    run be taken once, and no more than the cap in all (one decision at a time, under its embeddeck_run_slots row)."""
    import threading

    from jobs.store.registry import WAITING, Registry

    # On PostgreSQL a database of its own: the cap counts every active run in the registry.
    url = f"sqlite:///{tmp_path / 'slots.sqlite'}" if dialect == "sqlite" else fresh_pg_database(request, "slots")
    registry = Registry(url)
    ids = [registry.create("{}", "test", "s", f"t{i}", "m", "local[1]", target_key=f"k{i}", phase=WAITING)
           for i in range(6)]
    callers, cap, taken = 12, 3, []
    barrier = threading.Barrier(callers)

    def caller(i):
        mine = Registry(url)  # a connection pool of its own, as another process has
        barrier.wait()
        for run_id in ids[i % 6:] + ids[:i % 6]:
            if mine.take_waiting(run_id, cap):
                taken.append(run_id)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(taken) == cap and len(set(taken)) == cap, taken
    assert sorted(r.run_id for r in registry.list(active_only=True) if r.phase != WAITING) == sorted(taken)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_old_worker_samples_are_thinned_without_changing_a_cost_or_the_charts_gaps(dialect, sqlite_url, request):
    """The autoscaler's samples (one per 5 s tick, about 17,000 a day) grew without end in the registry. A sampling
    process now thins those older than a day, hourly, to what a run's cost and the chart's gaps read the same."""
    from dashboard.charts import with_gaps
    from jobs.core.cost import worker_seconds
    from jobs.store import scaling
    from jobs.store.registry import Registry

    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    registry = Registry(url)
    history = scaling.ScaleHistory(registry)
    with registry.engine.begin() as conn:
        conn.execute(scaling.samples_table.delete())
    now = db.utcnow()
    start = now - dt.timedelta(days=2)
    counts = [2] * 120 + [1] * 60 + [0] * 60  # 20 minutes every 5 s, scaled in twice
    ticks = [(start + dt.timedelta(seconds=5 * i), n) for i, n in enumerate(counts)]
    after_silence = start + dt.timedelta(minutes=40)  # the controller was stopped for 20 minutes
    ticks += [(after_silence + dt.timedelta(seconds=5 * i), 2) for i in range(60)]
    recent = [(now - dt.timedelta(seconds=5 * i), 1) for i in range(30, 0, -1)]
    with registry.engine.begin() as conn:
        conn.execute(scaling.samples_table.insert(), [{"at": at, "workers": n, "desired": n}
                                                      for at, n in ticks + recent])

    def seen() -> tuple:
        rows = history.samples(limit=10_000)
        series = history.counts(start - dt.timedelta(seconds=1), now)
        run = (series[0][0] + 30.0, series[0][0] + 2_700.0)  # a run across both scale-ins and the silence
        breaks = [r["at"] for r in with_gaps(rows) if r["workers"] is None]
        return len(rows), worker_seconds(series, run), breaks

    before_rows, before_cost, before_breaks = seen()
    history.sample(1, 1)  # a process's first sample thins at once
    after_rows, after_cost, after_breaks = seen()
    assert (before_rows, after_rows - len(recent) - 1) == (330, 27)  # 300 old samples thinned to about one a minute
    assert after_cost == pytest.approx(before_cost) and after_breaks == before_breaks != []
    assert [r["at"] for r in history.samples(limit=31)][:30] == [at for at, _ in recent]  # the last day: all
    assert history.thin(now - dt.timedelta(days=1)) == 0  # thinning again finds nothing more


def test_seed_demo_names_a_database_it_cannot_reach_in_one_line(tmp_path, pg_url):
    """seed-demo (what `make run` calls first) answered a wrong password, a server that is down or a file that is
    not a database with SQLAlchemy's traceback; the other verbs with one line and exit 2, as it does now."""
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database\n" * 100)
    for url, reason in [(pg_url.replace("s3cret-pg", "wrong-pw"), "password authentication failed"),
                        (f"postgresql+psycopg://u:pw-secret@127.0.0.1:{free_port()}/x", "Connection refused"),
                        (f"sqlite:///{garbage}", "file is not a database")]:
        out = subprocess.run([sys.executable, "-m", "jobs", "seed-demo", "--db", url], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("error: cannot connect to ") and reason in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "wrong-pw" not in out.stderr + out.stdout
        assert "pw-secret" not in out.stderr + out.stdout
    assert garbage.read_bytes() == b"not a database\n" * 100  # left as it was


@pytest.mark.parametrize("verb", [["list"], ["status", "r-x"], ["cancel", "r-x"]])
def test_a_registry_that_does_not_answer_is_named_in_one_line(verb):
    """EMBEDDECK_REGISTRY_URL with a wrong password or a server that is down ended every verb in a traceback."""
    url = f"postgresql+psycopg://u:pw-secret@127.0.0.1:{free_port()}/x"
    out = subprocess.run([sys.executable, "-m", "jobs", *verb], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, EMBEDDECK_REGISTRY_URL=url))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: the run registry (EMBEDDECK_REGISTRY_URL): cannot connect to "
                                 "postgresql+psycopg://u:***@127.0.0.1:") and "Connection refused" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "pw-secret" not in out.stderr + out.stdout


@pytest.mark.parametrize(("url", "named"), [
    ("mysql://u:pw-secret@127.0.0.1/x", "database 'mysql' is not supported"),
    ("postgresql+psycopg2://u:pw-secret@127.0.0.1/x", "database driver 'postgresql+psycopg2' is not installed here"),
    ("not a url pw-secret", "the database URL is not one SQLAlchemy reads"),
])
@pytest.mark.parametrize("verb", [["seed-demo"], ["search", "--target", "t", "q"],
                                  ["run", "--source", "s", "--id-column", "id", "--text-column", "t", "--target",
                                   "e"]])
def test_a_database_embeddeck_does_not_run_on_is_named_as_bad_input(url, named, verb):
    """`--db mysql://…` read "cannot connect to mysql://…: No module named 'MySQLdb'" (exit 2 as a server to retry,
    503 on the API), and seed-demo a traceback: it is the caller's choice of database, named with the forms taken."""
    out = subprocess.run([sys.executable, "-m", "jobs", verb[0], "--db", url, *verb[1:]], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"error: {named}") and ": sqlite:///path, postgresql+psycopg://" in out.stderr, \
        out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "pw-secret" not in out.stderr + out.stdout


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_seed_that_another_seed_beats_to_the_empty_table_reports_its_rows(dialect, sqlite_url, request):
    """Two `make run` (or `make run` and `seed-demo`) at once on a fresh database: both counted an empty table, and
    the second to insert ended in a traceback ("UNIQUE constraint failed: products.id", exit 1). The other seed is
    a second engine, filling the table just before this one's first insert."""
    from jobs.store.demo import seed_demo

    url = sqlite_url if dialect == "sqlite" else request.getfixturevalue("pg_url")
    table = f"raced_products_{os.getpid()}"
    engine, other, beaten = db.engine_for(url), sa.create_engine(url), []

    def other_seed_first(conn, cursor, statement, *_):
        if statement.startswith(f"INSERT INTO {table}") and not beaten:
            beaten.append(True)
            meta = sa.MetaData()
            theirs = sa.Table(table, meta, autoload_with=other)
            with other.begin() as their_conn:
                for part in product_chunks(12):
                    their_conn.execute(theirs.insert(), part)

    sa.event.listen(engine, "before_cursor_execute", other_seed_first)
    try:
        assert seed_demo(url, n=12, table=table) == 12
    finally:
        sa.event.remove(engine, "before_cursor_execute", other_seed_first)
        other.dispose()
    assert beaten
    with engine.begin() as conn:
        assert conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one() == 12
        conn.execute(sa.text(f"DROP TABLE {table}"))  # the server's database is the session's


def test_seed_demo_refuses_a_count_it_cannot_make_and_fills_a_missing_table_in_chunks(sqlite_url):
    # `seed-demo --rows 0` seeded 6,000 rows, and `--rows -5` crashed with a traceback after creating an empty table.
    def seed(*args):
        return subprocess.run([sys.executable, "-m", "jobs", "seed-demo", "--db", sqlite_url, *args],
                              capture_output=True, text=True, timeout=120)

    for rows in ("0", "-5", str(DEMO_MAX_ROWS + 1)):
        out = seed("--rows", rows)
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip() == f"error: demo rows must be between 1 and {DEMO_MAX_ROWS}, not {rows}"
    assert not sa.inspect(db.engine_for(sqlite_url)).has_table("products")
    out = seed("--rows", str(SEED_CHUNK_ROWS + 7))
    assert out.returncode == 0 and out.stdout.startswith(f"products: {SEED_CHUNK_ROWS + 7} rows in "), out
    with db.engine_for(sqlite_url).connect() as conn:
        ids = conn.execute(sa.text("SELECT id FROM products ORDER BY id")).scalars().all()
    assert ids == list(range(1, SEED_CHUNK_ROWS + 8))
    assert "the table was there already" in seed("--rows", "10").stdout
    # Generated a chunk at a time, the rows are those of one pass.
    assert [r for part in product_chunks(25, chunk=7) for r in part] == next(product_chunks(25, chunk=25))
