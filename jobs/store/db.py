"""Database access on SQLAlchemy: engines, catalog, target tables, range reads, vector upserts.

Three dialects: SQLite (embedded default), PostgreSQL (psycopg) and SQL Server (pyodbc).
Identifiers always come from the reflected catalog and are quoted by the dialect.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import socket
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import mssql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.types import UserDefinedType

from jobs.core import vectors
from jobs.core.errors import BadRequest, EmbedDeckError, Unavailable
from jobs.core.spec import RunSpec
from jobs.core.texts import MAX_TEXT_CHARS, normalize_text

TARGET_COLUMNS = ("source_id", "embedding", "model", "content_hash", "embedded_at")


class MSSQLVector(UserDefinedType):
    """SQL Server 2025 VECTOR(n); values travel as JSON array text."""

    cache_ok = True

    def __init__(self, dim: int | None = None):
        self.dim = dim

    def get_col_spec(self, **_: object) -> str:
        return f"VECTOR({self.dim})" if self.dim else "VECTOR"


# Reflection of an existing VECTOR column would otherwise give NullType with a warning.
mssql.base.ischema_names.setdefault("vector", MSSQLVector)


# Query parameters that carry a secret in SQLAlchemy, libpq, ODBC and cloud-driver URLs.
SECRET_KEYS = re.compile(r"pass(word|wd)?|pwd|secret|token|api[_-]?key|access[_-]?key|account[_-]?key|"
                         r"sas|sig|credential", re.IGNORECASE)
# Inside an ODBC connection string (odbc_connect=...): PWD=...; Password=...
ODBC_SECRET = re.compile(r"\b(pwd|password)\s*=\s*(\{[^}]*\}|[^;]*)", re.IGNORECASE)


def secret_values(url: str) -> list[str]:
    """Every secret a URL carries: its password, secret-named query values, PWD inside odbc_connect."""
    try:
        parsed = make_url(url)
    except Exception:
        return []
    found = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        for v in (value,) if isinstance(value, str) else value:
            if SECRET_KEYS.fullmatch(key):
                found.append(v)
            elif key.lower() == "odbc_connect":
                found += [m.group(2).strip("{}") for m in ODBC_SECRET.finditer(v)]
    return [v for v in found if v]


def redact_url(url: str) -> str:
    """The URL with every secret it carries replaced by ***, safe to show, store and log."""
    try:
        parsed = make_url(url)
    except Exception:
        return "<unparseable database URL>"
    query = {}
    for key, value in parsed.query.items():
        values = (value,) if isinstance(value, str) else tuple(value)
        if SECRET_KEYS.fullmatch(key):
            values = tuple("***" for _ in values)
        elif key.lower() == "odbc_connect":
            values = tuple(ODBC_SECRET.sub(lambda m: f"{m.group(1)}=***", v) for v in values)
        query[key] = values[0] if len(values) == 1 else values
    return parsed.set(query=query).render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def hide_secrets(text: str, url: str) -> str:
    """text with every secret of url replaced by ***."""
    for secret in secret_values(url):
        text = text.replace(secret, "***")
    return text


SQLITE_BUSY_S = 60  # how long a SQLite statement waits for another process's lock


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    # Undecodable bytes in a TEXT column must not abort a whole chunk: decode with U+FFFD.
    dbapi_conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    cur = dbapi_conn.cursor()
    # Concurrent Spark tasks commit to one file; with no busy timeout half the commits fail.
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_S * 1000}")
    # SQLite answers a switch to WAL while another connection switches the same file with "database is locked" at
    # once, its busy timeout unasked: processes opening a file at once (two `cluster scale`, a file another tool made
    # in the default journal mode) failed so. Retried within the same timeout.
    deadline = time.monotonic() + SQLITE_BUSY_S
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


URL_FORMS = "sqlite:///path, postgresql+psycopg://user:pw@host/db or mssql+pyodbc://user:pw@host:1433/db?driver=…"


def parse_url(url: str) -> sa.URL:
    """The URL's parts; BadRequest, which never quotes it (it may hold a password), where it has none."""
    try:
        return make_url(url)
    except sa.exc.ArgumentError:
        raise BadRequest(f"the database URL is not one SQLAlchemy reads: {URL_FORMS}") from None


@functools.lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    """One pooled engine per URL per process; BadRequest for a URL of a database or driver EmbedDeck does not run on
    (it had read as "cannot connect …: No module named 'MySQLdb'", a server to try again later)."""
    parsed = parse_url(url)
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mssql"):
        raise BadRequest(f"database {backend!r} is not supported: {URL_FORMS}")
    kwargs: dict = {"pool_pre_ping": True}
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_S}
    elif backend == "mssql":
        # Microsoft's driver batches executemany; FreeTDS crashes with it, so only then.
        driver = str(parsed.query.get("driver", ""))
        kwargs["fast_executemany"] = "ODBC Driver" in driver
    elif backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": 10}
        # Texts in UTF-8 whatever the database's encoding (the server converts them; one in SQL_ASCII holds bytes
        # of no declared encoding, which psycopg then handed over undecoded, and SQLAlchemy's first query failed on
        # them: "cannot connect …: cannot use a string pattern on a bytes-like object").
        if "client_encoding" not in parsed.query:
            kwargs["connect_args"]["client_encoding"] = "utf8"
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (ImportError, sa.exc.NoSuchModuleError) as exc:
        raise BadRequest(f"database driver {parsed.drivername!r} is not installed here "
                         f"({getattr(exc, 'name', None) or exc}): {URL_FORMS}") from None
    if backend == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def create_missing(engine: Engine, schema: sa.MetaData | sa.Index) -> None:
    """Create the tables (or the index) that do not exist yet. Another process may create one between the check
    and the CREATE (two runs starting on one database at once: one failed with "table embeddeck_targets already
    exists"); the next check then finds it. Each lost race leaves one more table made, so one attempt per table and
    one more suffice: any other error is raised by the last."""
    create = schema.create_all if isinstance(schema, sa.MetaData) else schema.create
    attempts = len(schema.tables) + 1 if isinstance(schema, sa.MetaData) else 2
    for attempt in range(attempts):
        try:
            create(engine, checkfirst=True)
            return
        except sa.exc.DatabaseError:
            if attempt == attempts - 1:
                raise


# EmbedDeck's own tables carry this prefix. The run registry may share the users' database (on ACA it is the run's
# SQL database), where a registry that took a users' existing `runs` table for its own added its 29 columns to it.
OWN_PREFIX = "embeddeck_"


def adopt_older_names(engine: Engine, schema: sa.MetaData) -> None:
    """Rename the tables an older EmbedDeck made without OWN_PREFIX (`runs`) to their names now, where the new name is
    free and the old table is ours: every required column of ours and no other. A users' table of that name stays."""
    inspector = sa.inspect(engine)
    names = set(inspector.get_table_names())
    for table in schema.tables.values():
        old = table.name.removeprefix(OWN_PREFIX)
        if old == table.name or table.name in names or old not in names:
            continue
        have = {c["name"] for c in inspector.get_columns(old)}
        if not {c.name for c in table.columns if not c.nullable} <= have <= set(table.columns.keys()):
            continue
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(rename_table_ddl(old, table.name, engine.dialect)))
        except sa.exc.DatabaseError:
            if not sa.inspect(engine).has_table(table.name):  # else another process renamed it first
                raise


def rename_table_ddl(old: str, new: str, dialect: sa.Dialect) -> str:
    """The statement that renames a default schema's table, as the dialect spells it (SQL Server has sp_rename)."""
    if dialect.name == "mssql":
        return "EXEC sp_rename {}, {}".format(*(("N'" + name.replace("'", "''") + "'") for name in (old, new)))
    prep = dialect.identifier_preparer
    return f"ALTER TABLE {prep.quote(old)} RENAME TO {prep.quote(new)}"


# What a database answers while it fails over, restarts or sheds load, and the same statement survives later: SQL
# Server's native errors of SqlClient's and Entity Framework's retry lists (failover, busy, resource limits, deadlock,
# transport), and the SQLSTATEs of a lost connection (08…), a login timeout, a deadlock or serialization failure, too
# many connections, and a server shutting down or starting up.
_SQLSERVER_TRANSIENT = frozenset({20, 64, 233, 1205, 1222, 10053, 10054, 10060, 10928, 10929, 40197, 40501, 40613,
                                  49918, 49919, 49920})
_TRANSIENT_STATES = ("08", "HYT00", "40001", "40P01", "53300", "57P01", "57P02", "57P03")


def transient(exc: sa.exc.DBAPIError, *engines: Engine) -> bool:
    """Whether a statement failed because its database was away or busy for a while (the same statement succeeds
    later), not because the database refused it: a dropped connection, a failover's error, or no answer now from
    one of the engines (those the failed step uses)."""
    if exc.connection_invalidated:
        return True
    if _sqlstate(exc.orig).startswith(_TRANSIENT_STATES):
        return True
    if any(int(n) in _SQLSERVER_TRANSIENT for n in re.findall(r"\((\d+)\) \(SQL\w+\)", str(exc.orig))):
        return True
    return not all(answers(engine) for engine in engines)


def _sqlstate(error: BaseException | None) -> str:
    """The SQLSTATE of a driver's error where it gives one (psycopg's attribute, pyodbc's first argument), else ''."""
    args = getattr(error, "args", ())
    state = getattr(error, "sqlstate", None) or (args[0] if args and isinstance(args[0], str) else "")
    return state if re.fullmatch(r"[0-9A-Z]{5}", state or "") else ""


def answers(engine: Engine) -> bool:
    """Whether the database answers now: it takes a connection and a query, or refuses the login or the database by
    SQLSTATE (class 28 or 3D, as SQL Server's driver says; psycopg's connect errors carry none, so a refused login
    there reads as no answer, and a run waits EMBEDDECK_DB_OUTAGE_S before it fails with it)."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.DBAPIError as exc:
        return _sqlstate(exc.orig).startswith(("28", "3D"))
    except Exception:
        return False


def connection_error_message(exc: Exception, url: str) -> str:
    """One line naming what failed, without the password."""
    first = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
    reason = first[0] if first else type(exc).__name__
    return f"cannot connect to {redact_url(url)}: {hide_secrets(reason, url)}"


def check_connection(url: str, timeout_s: float | None = None, create: bool = False) -> Engine:
    """Engine for url after a round trip (bounded by timeout_s when given); raises Unavailable with a
    redacted message. A SQLite file is made only where `create` says so (seed-demo's)."""
    try:
        missing = None if create else _missing_sqlite_file(url)
        if missing:
            raise BadRequest(f"database file {missing} does not exist")
        engine = engine_for(url)
        if timeout_s is not None:
            _probe(url, timeout_s)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return engine
    except EmbedDeckError:
        raise
    except Exception as exc:
        raise Unavailable(connection_error_message(exc, url)) from None


def sqlite_file(url: str) -> str | None:
    """The file path a SQLite URL names as written; None for other databases, in-memory ones and `file:` URIs."""
    parsed = parse_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return path


def absolute_url(url: str) -> str:
    """The URL with a relative SQLite path made absolute against this process's folder: a run's driver and its
    tasks work in folders of their own, where `sqlite:///data.sqlite` named no file."""
    path = sqlite_file(url)
    if path is None or Path(path).is_absolute():
        return url
    return make_url(url).set(database=str(Path(path).resolve())).render_as_string(hide_password=False)


def _missing_sqlite_file(url: str) -> str | None:
    """The file a SQLite URL names where it does not exist: connecting would create it (and its folders), and a
    mistyped path would then read as a database without tables."""
    path = sqlite_file(url)
    return None if path is None or Path(path).exists() else path


def _probe(url: str, timeout_s: float) -> None:
    """A TCP connect to the database's host within timeout_s: a stalled server fails fast here instead of
    holding a pooled connection attempt for the driver's own timeout."""
    parsed = make_url(url)
    if not parsed.host:
        return  # SQLite, or a driver-specific address (odbc_connect): nothing to probe
    port = parsed.port or {"postgresql": 5432, "mssql": 1433}.get(parsed.get_backend_name(), 0)
    try:
        with socket.create_connection((parsed.host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise Unavailable(f"cannot connect to {redact_url(url)}: {exc.strerror or type(exc).__name__}") from None


# Catalog schemas of the databases themselves, never a user's (SQL Server's db_* role schemas hold nothing).
SYSTEM_SCHEMAS = {"information_schema", "sys", "guest", "pg_catalog", "pg_toast"}


def user_schemas(names: list[str], default: str | None) -> list[str | None]:
    """None (the default schema), then the other schemas of `names` that hold users' tables."""
    return [None, *sorted(s for s in names if s != default and s.lower() not in SYSTEM_SCHEMAS
                          and not s.lower().startswith(("pg_temp", "pg_toast_temp", "db_")))]


def _schemas(inspector: sa.Inspector) -> list[str | None]:
    return user_schemas(inspector.get_schema_names(), inspector.default_schema_name)


def _qualified(schema: str | None, name: str) -> str:
    return name if schema is None else f"{schema}.{name}"


def _relations(inspector: sa.Inspector, schema: str | None = None) -> set[str]:
    """The tables and views of a schema (on PostgreSQL its materialized views too, which SQLAlchemy lists apart)."""
    names = {*inspector.get_table_names(schema), *inspector.get_view_names(schema)}
    if inspector.dialect.name == "postgresql":
        names |= set(inspector.get_materialized_view_names(schema))
    return names


def list_tables(engine: Engine) -> list[str]:
    """Table and view names, sorted: the default schema's as they are, other schemas' as `schema.name` (SQL Server
    databases keep tables in sales, hr, ...). A view is a source too (its text a join, or built from columns)."""
    inspector = sa.inspect(engine)
    return sorted(_qualified(schema, name) for schema in _schemas(inspector) for name in _relations(inspector, schema))


def list_targets(engine: Engine) -> list[str]:
    """Tables that hold EmbedDeck vectors (source_id, embedding, model), named as list_tables names them: what
    search can search."""
    inspector = sa.inspect(engine)
    # All of a schema's columns at once, one catalog query where the dialect has one: PostgreSQL answered for 305
    # tables in 15 ms, against 460 ms asked table by table (on every render of the Search page).
    return sorted(_qualified(schema, table) for schema in _schemas(inspector)
                  for (_, table), columns in inspector.get_multi_columns(schema).items()
                  if {"source_id", "embedding", "model"} <= {c["name"] for c in columns})


def _split_name(engine: Engine, name: str) -> tuple[str | None, str]:
    """(schema, table) of a name as list_tables gives it, the table as the catalog spells it (_catalog_case); a
    default-schema table named with a dot is itself."""
    inspector = sa.inspect(engine)
    if "." not in name or inspector.has_table(name):  # has_table finds views too
        schema, table = None, name
    else:
        schema, _, table = name.partition(".")
        # `dbo.Products`, `public.products`, `main.products`: the default schema's table, named as list_tables does
        # (a target filled from `public.products` had refused a run from `products` as another table's).
        if schema.lower() == (inspector.default_schema_name or "").lower():
            schema = None
    return schema, _catalog_case(engine, schema, table)


def _catalog_case(engine: Engine, schema: str | None, table: str) -> str:
    """The catalog's spelling of a table typed in another case, where it is the schema's one table or view of that
    name regardless of case; else the name as typed. SQLite and SQL Server read `PRODUCTS` as `products`, and so did
    half of SQLAlchemy's reflection: `--target CI_EMB` over `ci_emb` ended in NoSuchTableError."""
    try:
        names = _relations(sa.inspect(engine), schema)
    except sa.exc.SQLAlchemyError:  # a schema that does not exist: the checks after this name it
        return table
    if table in names:
        return table
    matches = [n for n in names if n.lower() == table.lower()]
    return matches[0] if len(matches) == 1 else table


def qualified_name(table: sa.Table) -> str:
    """A reflected table's name as list_tables gives it: `schema.table` outside the default schema."""
    return _qualified(table.schema, table.name)


def folded(dialect_name: str, table: str) -> str:
    """A table name as the database compares it: regardless of case on SQLite and SQL Server."""
    return table.lower() if dialect_name in ("sqlite", "mssql") else table


def target_key(url: str, target: str) -> str:
    """One key per target table, for one active run per target: the URL without its secrets, and the name folded
    where the database ignores case: `NEW_EMB` and `new_emb`, neither there yet, had both run."""
    return f"{redact_url(url)}|{folded(parse_url(url).get_backend_name(), target)}"


def _check_schema(engine: Engine, schema: str | None, name: str) -> None:
    """BadRequest when a new table's schema does not exist: the run was recorded and then failed on its CREATE
    with the driver's own "schema … does not exist" (PostgreSQL) or "unknown database …" (SQLite)."""
    if schema is None:
        return
    inspector = sa.inspect(engine)
    names = inspector.get_schema_names()
    fold = str.lower if engine.dialect.name == "mssql" else str  # SQL Server's catalog names ignore case
    if fold(schema) not in map(fold, names):
        known = ", ".join(s or inspector.default_schema_name for s in _schemas(inspector))
        raise BadRequest(f"target table {name!r}: schema {schema!r} does not exist (schemas: {known}); a name with a "
                         f"dot is read as schema.table")


def _check_name_length(engine: Engine, name: str) -> None:
    """BadRequest for a table name longer than the database holds: the run was recorded and failed on its CREATE
    (PostgreSQL: 63 bytes; SQL Server: 128 characters)."""
    limit = engine.dialect.max_identifier_length
    size = len(name.encode()) if engine.dialect.name == "postgresql" else len(name)
    if size > limit:
        unit = "bytes" if engine.dialect.name == "postgresql" else "characters"
        raise BadRequest(f"target table name {name!r} is {size} {unit} long; {engine.dialect.name} holds names of at "
                         f"most {limit}: pick a shorter one")


def reflect(engine: Engine, name: str, role: str = "table") -> sa.Table:
    """The table as the catalog has it; BadRequest naming it when it does not exist."""
    schema, table = _split_name(engine, name)
    if not sa.inspect(engine).has_table(table, schema=schema):
        known = ", ".join(list_tables(engine)[:20]) or "none"
        raise BadRequest(f"{role} table {name!r} does not exist (tables: {known})")
    return sa.Table(table, sa.MetaData(), schema=schema, autoload_with=engine)


def column(table: sa.Table, name: str, role: str) -> sa.Column:
    """A column of table, typed in any case where only one column matches it so; BadRequest naming it and the columns
    that exist."""
    if name in table.c:
        return table.c[name]
    matches = [c for c in table.c if c.name.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(c.name for c in table.c)
    raise BadRequest(f"{role} column {name!r} is not in table {table.name!r} (columns: {known})")


def key_columns(engine: Engine, table: sa.Table) -> list[str]:
    """Columns that the catalog declares one row each: a one-column primary key, unique constraint or unique
    index (the primary key first)."""
    inspector = sa.inspect(engine)
    declared = [[c.name for c in table.primary_key.columns]]
    declared += [u["column_names"] for u in inspector.get_unique_constraints(table.name, schema=table.schema)]
    declared += [i["column_names"] for i in inspector.get_indexes(table.name, schema=table.schema) if i["unique"]]
    return list(dict.fromkeys(names[0] for names in declared if len(names) == 1))


def is_integer_type(col_type: sa.types.TypeEngine) -> bool:
    """Whether a column holds whole numbers (integers, or decimals of scale 0)."""
    return isinstance(col_type, sa.Integer) or (
        isinstance(col_type, sa.Numeric) and getattr(col_type, "scale", None) == 0
    )


def key_kind(col_type: sa.types.TypeEngine) -> str | None:
    """What a key column holds: "integer", "uuid" or "text" (not an enum); None for any other type."""
    if is_integer_type(col_type):
        return "integer"
    if isinstance(col_type, sa.Uuid):
        return "uuid"
    if isinstance(col_type, sa.String) and not isinstance(col_type, sa.Enum):
        return "text"
    return None


def is_key_type(col_type: sa.types.TypeEngine) -> bool:
    """Whether runs can key a source by a column of this type: integers, text (not an enum) or UUIDs."""
    return key_kind(col_type) is not None


SQLSERVER_KEY_BYTES = 900  # the most a clustered primary key's column may hold in SQL Server


def key_type_problem(name: str, col_type: sa.types.TypeEngine, dialect_name: str) -> str | None:
    """Why a run cannot key its target by a column of this type, or None when it can."""
    if not is_key_type(col_type):
        return f"id column {name!r} is {col_type}; runs need an integer, text or UUID id column"
    if dialect_name == "mssql" and isinstance(col_type, sa.String) and (
            col_type.length is None or col_type.length * (2 if isinstance(col_type, sa.Unicode) else 1)
            > SQLSERVER_KEY_BYTES):
        return (f"id column {name!r} is {col_type}, which SQL Server cannot key a target by (a key holds at most "
                f"{SQLSERVER_KEY_BYTES} bytes): pick a column of at most NVARCHAR(450) or VARCHAR(900)")
    return None


@dataclass
class Tables:
    """Source and target of a run, reflected or created."""

    source: sa.Table
    id_col: sa.Column
    text_col: sa.Column
    target: sa.Table | None
    vector_native: bool
    target_name: str  # as list_tables names it, whether it exists yet or not


def inspect_run(engine: Engine, spec: RunSpec) -> Tables:
    """Check source, columns and an existing target against the catalog; BadRequest if wrong."""
    source = reflect(engine, spec.source, "source")
    id_col = column(source, spec.id_column, "id")
    text_col = column(source, spec.text_column, "text")
    problem = key_type_problem(spec.id_column, id_col.type, engine.dialect.name)
    if problem:
        raise BadRequest(problem)
    target = None
    schema, name = _split_name(engine, spec.target)
    if schema is None and folded(engine.dialect.name, name) == targets_table.name:
        # Made as a target before its first run recorded one, it broke every later run on the database.
        raise BadRequest(f"target table {spec.target!r} is where EmbedDeck records each target's source: pick "
                         f"another target")
    _check_schema(engine, schema, spec.target)
    _check_name_length(engine, name)
    if sa.inspect(engine).has_table(name, schema=schema):
        target = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=engine)
        check_target(target, engine)
        held = target.c.source_id.type
        if key_kind(held) != key_kind(id_col.type):
            # A target made by hand, or for another source: its first write failed with the database's own error
            # ("datatype mismatch"; PostgreSQL: "operator does not exist: integer = character varying").
            raise BadRequest(f"existing target table {target.name!r} keys its vectors by source_id {held}, and id "
                             f"column {id_col.name!r} is {id_col.type}: pick a target keyed by "
                             f"{key_kind(id_col.type)}, or a new one")
    tables = Tables(source, id_col, text_col, target,
                    target is not None and isinstance(target.c.embedding.type, MSSQLVector), _qualified(schema, name))
    if target is not None:
        check_origin(engine, spelled_as_catalog(spec, tables), target)
    return tables


def spelled_as_catalog(spec: RunSpec, tables: Tables) -> RunSpec:
    """The spec with its tables and columns named as the catalog spells them (a new target as typed, but for a
    default schema's name): a target remembers its source by name, and `--source PRODUCTS` or `public.products` had
    been another table to it than `products`."""
    return replace(spec, source=qualified_name(tables.source), id_column=tables.id_col.name,
                   text_column=tables.text_col.name, target=tables.target_name)


def check_origin(engine: Engine, spec: RunSpec, target: sa.Table) -> None:
    """Refuse a run into a target that holds another table's rows (or the same table's under another id): the ids
    would mix, and search would show one table's text beside another's vector. An empty target takes any source:
    a run that failed before its first vector (a repeated id) had bound it to a source it holds nothing of."""
    origin = target_origin(engine, spec.target)
    # Read as the catalog spells it: a target recorded before runs did so may name its source `public.products`.
    if origin and (_qualified(*_split_name(engine, origin["source"])), origin["id_column"].lower()) != (
            spec.source, spec.id_column.lower()) and not _is_empty(engine, target):
        raise BadRequest(f"target table {spec.target!r} holds the vectors of {origin['source']!r} by id column "
                         f"{origin['id_column']!r}, not of {spec.source!r} by {spec.id_column!r}: pick another target")


def _is_empty(engine: Engine, table: sa.Table) -> bool:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first() is None


def check_target(target: sa.Table, engine: Engine) -> None:
    """Refuse an existing target that cannot hold our upserts, saying what differs."""
    problems = [f"column {c!r} is missing" for c in TARGET_COLUMNS if c not in target.c]
    if "embedding" in target.c:
        etype = target.c.embedding.type
        if not isinstance(etype, (sa.LargeBinary, MSSQLVector, sa.types._Binary)):
            problems.append(f"column 'embedding' is {etype}, not a binary or VECTOR type")
    if "source_id" in target.c and "source_id" not in key_columns(engine, target):
        problems.append("column 'source_id' is not the primary key")
    if problems:
        raise BadRequest(f"existing target table {target.name!r} is incompatible: " + "; ".join(problems))


def target_table(name: str, id_type: sa.types.TypeEngine, vector_type: sa.types.TypeEngine,
                 schema: str | None = None) -> sa.Table:
    """The target table's definition: one row per source id."""
    # A convention, not a name: SQLAlchemy cuts a convention's name to the database's limit with a hash of the whole
    # (PostgreSQL's 63 characters refused `ix_<a 52-character target>_embedded_at`, and the run failed).
    metadata = sa.MetaData(naming_convention={"ix": "ix_%(table_name)s_%(column_0_name)s"})
    table = sa.Table(
        name, metadata,
        sa.Column("source_id", id_type, primary_key=True, autoincrement=False),
        sa.Column("embedding", vector_type, nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("embedded_at", sa.DateTime(), nullable=False),
        schema=schema,
    )
    # Progress is counted as rows embedded since the run started; the index keeps that cheap.
    sa.Index(None, table.c.embedded_at)
    return table


def native_vectors_supported(version: tuple, engine_edition: int | None) -> bool:
    """Whether a SQL Server stores VECTOR(n): SQL Server 2025 (major version 17 and later), and Azure SQL
    Database (engine edition 5, which reports version 12)."""
    return tuple(version[:1]) >= (17,) or engine_edition == 5


def has_native_vectors(engine: Engine) -> bool:
    """Whether this database gets VECTOR(n) targets (SQL Server 2025 / Azure SQL) rather than VARBINARY."""
    if engine.dialect.name != "mssql":
        return False
    with engine.connect() as conn:
        edition = conn.execute(sa.text("SELECT CAST(SERVERPROPERTY('EngineEdition') AS int)")).scalar()
    return native_vectors_supported(engine.dialect.server_version_info or (), edition)


def vector_type_for(dialect_name: str, dim: int, native: bool = False) -> sa.types.TypeEngine:
    """Column type for a new embedding column in this dialect."""
    if dialect_name == "mssql":
        return MSSQLVector(dim) if native else mssql.VARBINARY(8000)
    return sa.LargeBinary()


def stored_dim(engine: Engine, target: sa.Table) -> int | None:
    """The dimension of the vectors a target holds (its VECTOR(n) type, else one stored row), None if empty."""
    declared = getattr(target.c.embedding.type, "dim", None)
    if declared:
        return int(declared)
    with engine.connect() as conn:
        value = conn.execute(sa.select(target.c.embedding).limit(1)).scalar()
    if value is None:
        return None
    return len(vectors.from_json(value)) if isinstance(value, str) else len(value) // 4


def ensure_target(engine: Engine, spec: RunSpec, tables: Tables, dim: int) -> sa.Table:
    """The existing compatible target, or a new one created with the contract's columns; BadRequest when the
    target already holds vectors of another size than this run's model makes."""
    if tables.target is not None:
        held = stored_dim(engine, tables.target)
        if held is not None and held != dim:
            raise BadRequest(f"target table {spec.target!r} holds {held}-dimension vectors; {spec.model_identity} "
                             f"makes {dim}: use another target")
        return tables.target
    schema, name = _split_name(engine, spec.target)
    id_type = tables.id_col.type  # text keeps its length and collation: the target's key compares as the source's
    if is_integer_type(id_type) and not isinstance(id_type, sa.Integer):
        id_type = sa.BigInteger()
    table = target_table(name, id_type, vector_type_for(engine.dialect.name, dim, has_native_vectors(engine)), schema)
    create_missing(engine, table.metadata)
    tables.target = table
    return table


def id_counts(engine: Engine, source: sa.Table, id_col: sa.Column) -> tuple[int, int]:
    """(rows with an id, rows whose id is NULL) of the source."""
    with engine.connect() as conn:
        rows, with_id = conn.execute(sa.select(sa.func.count(), sa.func.count(id_col)).select_from(source)).one()
    return int(with_id), int(rows) - int(with_id)


def misfit_ids(engine: Engine, source: sa.Table, id_col: sa.Column) -> tuple[int, str] | None:
    """(how many, the least quoted) of the ids that are not of their column's declared kind, or None. Only SQLite
    keeps any value in any column (`x` in a BIGINT key): a target's integer key (the rowid's alias) refuses it, and a
    blob in its text key failed search."""
    if engine.dialect.name != "sqlite":
        return None
    kind = "integer" if is_integer_type(id_col.type) else "text"
    with engine.connect() as conn:
        count, example = conn.execute(
            sa.select(sa.func.count(), sa.func.min(sa.func.quote(id_col))).select_from(source)
            .where(sa.func.typeof(id_col).not_in([kind, "null"]))).one()
    return (int(count), example) if count else None


def ids_at_query(source: sa.Table, id_col: sa.Column, positions: list[int]) -> sa.Select:
    """(position, id) at these 0-based positions of the source's rows in id order; the scan stops at the last."""
    first = (sa.select(id_col.label("id")).select_from(source).where(id_col.is_not(None))
             .order_by(id_col).limit(max(positions) + 1).subquery())
    numbered = sa.select(first.c.id, (sa.func.row_number().over(order_by=first.c.id) - 1).label("pos")).subquery()
    return sa.select(numbered.c.pos, numbered.c.id).where(numbered.c.pos.in_(sorted(set(positions))))


def ids_at(engine: Engine, source: sa.Table, id_col: sa.Column, positions: list[int]) -> list:
    """The ids at these positions in id order (ids_at_query), one per position asked that still holds a row."""
    with engine.connect() as conn:
        found = {int(pos): i for pos, i in conn.execute(ids_at_query(source, id_col, positions))}
    return [found[p] for p in positions if p in found]  # rows deleted since they were counted have none


def text_prefix(text_col: sa.Column, dialect_name: str) -> sa.ColumnElement:
    """The column cut in the database to a prefix that still holds its first MAX_TEXT_CHARS characters;
    columns of other types as they are."""
    # Why in the database: a chunk of 2,048 rows of 700 KB texts took 1.3 GB in a task, cut there 131 MB.
    # Why not at exactly MAX_TEXT_CHARS everywhere: normalize_text, and so the stored hash, must see the same
    # characters as before, and some databases count in other units than Python's code points: bytes (BLOB,
    # bytea, varbinary: at most 4 a character) and, in SQL Server's non-SC collations, UTF-16 units (at most 2),
    # where a cut inside a surrogate pair would also fail pyodbc's strict UTF-16 decoding: stop one unit short.
    chars, units, octets = MAX_TEXT_CHARS, 2 * MAX_TEXT_CHARS, 4 * MAX_TEXT_CHARS
    if dialect_name == "sqlite":  # typed per value, whatever the column declares
        kind = sa.func.typeof(text_col)
        # SQLite's text functions end a text at its first NUL ('a\0b' read as 'a'), so such a text is cut as its
        # bytes and read back as text, whole to the cut; normalize_text blanks the NULs. Back as text, not as the
        # bytes: those are in the database's encoding, and a UTF-16 database's had been read as UTF-8 ("h e l l o").
        as_bytes = sa.func.substr(sa.cast(text_col, sa.LargeBinary), 1, octets)
        # Looked for in the bytes kept only: 300 texts of 800 KB read in 169 ms (86 ms without the check). In a
        # UTF-16 database nearly every text has a zero byte, and takes this way.
        nul = sa.func.instr(as_bytes, sa.literal(b"\0", sa.LargeBinary)) > 0
        return sa.case((sa.and_(kind == "text", ~nul), sa.func.substr(text_col, 1, chars)),
                       (kind == "text", sa.cast(as_bytes, sa.Text)),
                       (kind == "blob", sa.func.substr(text_col, 1, octets)), else_=text_col)
    if isinstance(text_col.type, sa.LargeBinary):
        return sa.func.substring(text_col, 1, octets)
    # Numbers, JSON, enums (PostgreSQL has no substring of an enum) and char(n) are read as they are: a char(n)
    # value is short by its type, and PostgreSQL's substring would drop its blank padding, changing the hash.
    if not isinstance(text_col.type, sa.String) or isinstance(text_col.type, (sa.Enum, sa.CHAR, sa.NCHAR)):
        return text_col
    if dialect_name == "mssql":
        split_pair = sa.func.unicode(sa.func.substring(text_col, units, 1)).between(0xD800, 0xDBFF)
        return sa.case((split_pair, sa.func.substring(text_col, 1, units - 1)),
                       else_=sa.func.substring(text_col, 1, units))
    return sa.func.substring(text_col, 1, chars)


def chunk_query(source: sa.Table, id_col: sa.Column, text_col: sa.Column, target: sa.Table,
                start, start_included: bool, hi, limit: int, dialect_name: str) -> sa.Select:
    """The first `limit` rows in id order from `start` (above it, or from it where start_included; None: from the
    first row) up to `hi`: source id and text (cut by text_prefix) beside the stored hash and model."""
    j = source.outerjoin(target, target.c.source_id == id_col)
    q = (sa.select(id_col.label("id"), text_prefix(text_col, dialect_name).label("text"),
                   target.c.content_hash.label("hash"), target.c.model.label("model"))
         .select_from(j).where(id_col <= hi))
    if start is not None:
        q = q.where(id_col >= start if start_included else id_col > start)
    return q.order_by(id_col).limit(limit)


def upsert_statement(target: sa.Table, dialect_name: str, native_dim: int | None = None):
    """Idempotent insert-or-update keyed by source_id, as executemany-able statement."""
    cols = list(TARGET_COLUMNS)
    if dialect_name in ("sqlite", "postgresql"):
        ins = (sqlite.insert if dialect_name == "sqlite" else postgresql.insert)(target)
        return ins.on_conflict_do_update(
            index_elements=[target.c.source_id],
            set_={c: ins.excluded[c] for c in cols if c != "source_id"},
        )
    if dialect_name == "mssql":
        prep = mssql.dialect().identifier_preparer
        q = {c: prep.quote(c) for c in cols}
        emb = f"CAST(:embedding AS VECTOR({native_dim}))" if native_dim else ":embedding"
        src = ", ".join(
            [f":source_id AS {q['source_id']}", f"{emb} AS {q['embedding']}"]
            + [f":{c} AS {q[c]}" for c in cols[2:]])
        sets = ", ".join(f"tgt.{q[c]} = src.{q[c]}" for c in cols[1:])
        names = ", ".join(q[c] for c in cols)
        values = ", ".join(f"src.{q[c]}" for c in cols)
        return sa.text(
            f"MERGE INTO {prep.format_table(target)} WITH (HOLDLOCK) AS tgt "
            f"USING (SELECT {src}) AS src ON tgt.{q['source_id']} = src.{q['source_id']} "
            f"WHEN MATCHED THEN UPDATE SET {sets} "
            f"WHEN NOT MATCHED THEN INSERT ({names}) VALUES ({values});"
        )
    raise BadRequest(f"database dialect {dialect_name!r} is not supported (sqlite, postgresql, mssql)")


def encode_for(target: sa.Table, vector) -> object:
    """A vector in the form the target's embedding column takes."""
    if isinstance(target.c.embedding.type, MSSQLVector):
        return vectors.to_json(vector)
    return vectors.to_bytes(vector)


def upsert(conn: Connection, target: sa.Table, rows: list[dict]) -> None:
    """Upsert rows (dicts with the target's columns) in the caller's transaction."""
    if not rows:
        return
    native = isinstance(target.c.embedding.type, MSSQLVector)
    dim = len(vectors.from_json(rows[0]["embedding"])) if native else None
    conn.execute(upsert_statement(target, conn.dialect.name, dim), rows)


IN_LIST_IDS = 1000  # SQL Server takes at most 2,100 parameters a statement; a chunk may hold 100,000 rows


def delete_vectors(conn: Connection, target: sa.Table, ids: list) -> int:
    """Delete the vectors of these source ids, IN_LIST_IDS a statement; the count deleted."""
    return sum(conn.execute(target.delete().where(target.c.source_id.in_(ids[i:i + IN_LIST_IDS]))).rowcount
               for i in range(0, len(ids), IN_LIST_IDS))


def orphans_delete(id_col: sa.Column, target: sa.Table) -> sa.Delete:
    """The vectors whose source row is gone (id_col is the source's), as one anti-join DELETE."""
    return target.delete().where(~sa.exists().where(id_col == target.c.source_id))


def delete_orphans(engine: Engine, id_col: sa.Column, target: sa.Table) -> int:
    """Delete the vectors whose source row is gone; the count deleted."""
    with engine.begin() as conn:
        return conn.execute(orphans_delete(id_col, target)).rowcount


def utcnow() -> dt.datetime:
    """Naive UTC timestamp, the form every dialect stores in a DateTime column."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def count_embedded_since(engine: Engine, target: sa.Table, since: dt.datetime) -> int:
    """Rows of target written at or after since: the progress of the run that started then."""
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(target)
                                .where(target.c.embedded_at >= since)).scalar_one())


def target_models(engine: Engine, target: sa.Table) -> list[str]:
    """Distinct model names stored in a target."""
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(sa.select(target.c.model).distinct())]


targets_table = sa.Table(
    f"{OWN_PREFIX}targets", sa.MetaData(),
    sa.Column("target", sa.String(400), primary_key=True),
    sa.Column("source", sa.String(400), nullable=False),
    sa.Column("id_column", sa.String(400), nullable=False),
    sa.Column("text_column", sa.String(400), nullable=False),
    sa.Column("model", sa.String(400), nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
)


def record_target(engine: Engine, spec: RunSpec) -> None:
    """Remember which source and columns a target was embedded from (search shows that text)."""
    create_missing(engine, targets_table.metadata)
    values = {"source": spec.source, "id_column": spec.id_column, "text_column": spec.text_column,
              "model": spec.model_identity, "updated_at": utcnow()}
    with engine.begin() as conn:
        n = conn.execute(targets_table.update().where(targets_table.c.target == spec.target)
                         .values(**values)).rowcount
        if n == 0:
            conn.execute(targets_table.insert().values(target=spec.target, **values))


def target_origin(engine: Engine, target: str) -> dict | None:
    """Source, id column, text column and model a target was last embedded from, if known."""
    if not sa.inspect(engine).has_table(targets_table.name):
        return None
    with engine.connect() as conn:
        row = conn.execute(targets_table.select().where(targets_table.c.target == target)).mappings().first()
    return dict(row) if row else None


def count_unembedded(engine: Engine, tables: Tables, model: str) -> int:
    """Rows with text that have no vector of this model yet (changed texts are found at planning)."""
    q = sa.select(sa.func.count()).where(tables.text_col.is_not(None))
    if tables.target is None:
        q = q.select_from(tables.source)
    else:
        t = tables.target
        q = (q.select_from(tables.source.outerjoin(t, t.c.source_id == tables.id_col))
             .where(sa.or_(t.c.source_id.is_(None), t.c.model != model)))
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def texts(engine: Engine, table: sa.Table, id_col: sa.Column, text_col: sa.Column, ids: list | None = None,
          limit: int | None = None) -> dict:
    """Texts by id as a run embeds them (cut in the read, normalised): of the given ids, or the first `limit`."""
    q = sa.select(id_col, text_prefix(text_col, engine.dialect.name)).select_from(table).where(id_col.is_not(None))
    if ids is not None:
        q = q.where(id_col.in_(ids))
    if limit is not None:
        q = q.limit(limit)
    with engine.connect() as conn:
        return {i: normalize_text(t) for i, t in conn.execute(q)}
