"""The Spark job of a run: plan key ranges, then read, encode and upsert inside tasks.

`execute` runs on a SparkContext that jobs/spark/ provides (its own spark-submit driver, or the warm
run service). No vector passes through the driver: each task reads its own id range from the database,
encodes with the model cached in its Python worker, and commits its upserts per chunk.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from jobs.core import plan
from jobs.core.errors import BadRequest, EmbedDeckError, Unavailable, from_kind
from jobs.core.processes import started_at
from jobs.core.progress import rate
from jobs.core.settings import HOLD_FILE_VAR, Settings
from jobs.core.spec import RunSpec
from jobs.core.texts import content_hash, normalize_text
from jobs.embed.encoder import get_encoder, model_dim
from jobs.store import db, endpoints
from jobs.store.registry import CANCELLED, FAILED, SUCCEEDED, Registry

log = logging.getLogger("embeddeck.pipeline")

PROGRESS_EVERY_S = 2.0
# Executors register within seconds of an application's start (or of a worker's): a run that held none for longer
# waits for a worker's cores, and says so.
NO_EXECUTOR_GRACE_S = 10.0
OUTAGE_POLL_S = 1.0  # how often a task tries its database again while it does not answer
T = TypeVar("T")
ONE_ROW_PER_ID = "A target keeps one vector per id: pick a column that is the table's key (a primary key)."


def _tables(spec: RunSpec) -> db.Tables:
    engine = db.engine_for(spec.db_url)
    tables = db.inspect_run(engine, spec)
    if tables.target is None:
        raise BadRequest(f"target table {spec.target!r} does not exist")
    return tables


def _chunks(spec: RunSpec, tables: db.Tables, after, hi) -> Iterator[list]:
    """Rows of the key range (after, hi] with their stored hash and model, chunk by chunk (bounded memory);
    BadRequest at an id that two rows share, as a target keeps one vector per id and would flip between their
    texts run after run."""
    engine = db.engine_for(spec.db_url)
    last = None
    while True:
        # Each chunk starts at the last id read, that row again: a second row with that id shows even where a
        # chunk ends between the two.
        start, extra = (after, 0) if last is None else (last, 1)
        q = db.chunk_query(tables.source, tables.id_col, tables.text_col, tables.target,
                           start, bool(extra), hi, spec.chunk_rows + extra, engine.dialect.name)
        with engine.connect() as conn:
            rows = conn.execute(q).all()
        rows = rows[1:] if extra and rows and rows[0][0] == last else rows
        if not rows:
            return
        repeated = plan.repeated_id(last, [row[0] for row in rows])
        if repeated is not None:
            raise BadRequest(f"id column {spec.id_column!r} of {spec.source!r} is not unique: id "
                             f"{plan.shown_id(repeated)} is in more than one row. {ONE_ROW_PER_ID}")
        yield rows
        last = rows[-1][0]


@dataclass(frozen=True)
class TaskPlan:
    """All a task's closure carries: the spec without its database URL, a broadcast that holds the run's
    secrets (its id travels in the closure, the value only over the application's own authenticated
    channel, and it is destroyed when the run ends), the endpoint's URL without its key, and the vector
    size the target holds. Nothing in the closure is a secret."""

    spec: RunSpec
    secrets: object  # pyspark Broadcast of {"db_url", "api_key"}
    endpoint_url: str | None
    dim: int

    def open(self) -> tuple[RunSpec, str | None]:
        """In a task: the spec with its real database URL, and the endpoint's key."""
        secrets = self.secrets.value
        return self.spec.with_db_url(secrets["db_url"]), secrets.get("api_key")


def _classify(spec: RunSpec, rows: list) -> tuple[list[tuple[Hashable, str, str]], list[Hashable], int, int]:
    """Split a chunk into rows to embed (id, text, hash), the ids of rows whose text is now empty but that still
    have a vector, and the counts of empty and up-to-date rows."""
    todo, emptied, empty, current = [], [], 0, 0
    for row_id, raw, stored_hash, stored_model in rows:
        text = normalize_text(raw)
        if text is None:
            empty += 1
            if stored_hash is not None:
                emptied.append(row_id)
            continue
        digest = content_hash(text)
        if plan.needs_vector(text, digest, stored_hash, stored_model, spec.model_identity, spec.mode):
            todo.append((row_id, text, digest))
        else:
            current += 1
    return todo, emptied, empty, current


def commit_groups(encoder, texts: list[str], batch_size: int, first_commit: bool
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in texts, vectors) to commit together, encoded as plan.encode_spans says."""
    for span, at_least in plan.encode_spans(len(texts), batch_size, first_commit):
        steps = encoder.encode_batches(texts[span], batch_size)
        for group in plan.gather(steps, lambda step: len(step[0]), at_least):
            yield (np.concatenate([rows for rows, _ in group]) + span.start,
                   np.concatenate([vecs for _, vecs in group]))


def _worker_encoder(model: str, endpoint: str | None = None, api_key: str | None = None, name: str | None = None):
    """The encoder of this Python worker, with torch limited to the task's share of cores."""
    if endpoint:
        return get_encoder(model, endpoint=endpoint, api_key=api_key, name=name)
    threads = Settings().integer("EMBEDDECK_TORCH_THREADS")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    return get_encoder(model)


def _errors_as_results(task: TaskPlan):
    """Our own errors leave a task as a result the driver turns back into the same kind, not as a
    traceback: retrying a missing table or model four times would only delay the same answer. So does a
    database error whose cause is a table or column changed under the run, named as validation names it."""

    def wrap(function):
        @functools.wraps(function)
        def run(items: Iterator) -> Iterator[dict]:
            try:
                yield from function(items)
            except EmbedDeckError as exc:
                yield {"error": {"kind": exc.kind, "message": str(exc)}}
            except DBAPIError:
                changed = _catalog_change(task.open()[0])
                if changed is None:
                    raise  # a lost connection, a lock: Spark tries the task again
                yield {"error": {"kind": changed.kind, "message": f"{changed} (it changed while the run was in "
                                 "flight; a rerun embeds only what is missing)"}}

        return run

    return wrap


def _catalog_change(spec: RunSpec) -> BadRequest | None:
    """What validation would now refuse in the run's tables (a column renamed, a table dropped), if anything."""
    try:
        _tables(spec)
        return None
    except BadRequest as exc:
        return exc
    except DBAPIError:  # the database itself failed, not its catalog
        return None


def _raise_task_error(results: list[dict]) -> None:
    """Raise the first error a task returned, with its kind."""
    for result in results:
        if "error" in result:
            raise from_kind(result["error"]["kind"], result["error"]["message"])


def _hold_while_exists(path: str, every_s: float = 0.05) -> None:
    """Fault injection for tests and drills ($EMBEDDECK_FAULT_HOLD_FILE): a task that has committed its
    first rows waits while the file exists, so a cancel or a killed worker lands mid-run however fast
    the machine encodes. Unset (the default), tasks never look."""
    while os.path.exists(path):
        time.sleep(every_s)


def warm_partitions(model: str):
    """mapPartitions function: load the model into this Python worker's cache; yields the worker's
    daemon pid (one per executor) and the seconds the load took."""

    def run(_: Iterator) -> Iterator[tuple[int, float]]:
        t0 = time.perf_counter()
        _worker_encoder(model)
        yield os.getppid(), time.perf_counter() - t0

    return run


def scan_partitions(task: TaskPlan):
    """mapPartitions function: count per key range what the run has to embed."""

    @_errors_as_results(task)
    def run(ranges: Iterator[tuple]) -> Iterator[dict]:
        spec, api_key = task.open()
        ride = functools.partial(_through_outages, (db.engine_for(spec.db_url),))
        tables = ride(_tables, spec)
        # Python workers are reused by the embedding job: loading the model here overlaps the
        # import and load (seconds) with planning instead of stalling the first chunk.
        marks = {"worker_started": started_at()}  # forked from the executor's daemon
        t0 = time.perf_counter()
        _worker_encoder(spec.model, task.endpoint_url, api_key, spec.endpoint)
        marks["model_ready"] = time.time()
        marks["model_load_s"] = time.perf_counter() - t0  # ~0 when this worker already holds the model
        def scan(after, hi) -> dict:
            counts = {"rows": 0, "needed": 0, "emptied": 0, "empty": 0, "current": 0}
            for chunk in _chunks(spec, tables, after, hi):
                todo, emptied, empty, current = _classify(spec, chunk)
                counts["rows"] += len(chunk)
                counts["needed"] += len(todo)
                counts["emptied"] += len(emptied)
                counts["empty"] += empty
                counts["current"] += current
            return counts

        for index, after, hi in ranges:
            counts = ride(scan, after, hi)
            yield {"index": index, "after": after, "hi": hi, **counts, "marks": marks}

    return run


def embed_partitions(task: TaskPlan):
    """mapPartitions function: read, encode and upsert each key range, committing every few hundred rows."""

    @_errors_as_results(task)
    def run(ranges: Iterator[tuple]) -> Iterator[dict]:
        spec, api_key = task.open()
        engine = db.engine_for(spec.db_url)
        ride = functools.partial(_through_outages, (engine,))
        tables = ride(_tables, spec)
        hold = Settings().raw(HOLD_FILE_VAR)
        encoder = _worker_encoder(spec.model, task.endpoint_url, api_key, spec.endpoint)

        def embed(after, hi, done: dict) -> None:
            """One key range; `done` keeps its counts across attempts, as a repeat skips what the last committed."""
            for chunk in _chunks(spec, tables, after, hi):
                todo, emptied, _, _ = _classify(spec, chunk)
                if emptied:
                    with engine.begin() as conn:
                        done["removed"] += db.delete_vectors(conn, tables.target, emptied)
                todo.sort(key=lambda row: len(row[1]))  # shortest first: the first commit's rows
                groups = commit_groups(encoder, [text for _, text, _ in todo], spec.batch_size,
                                       done["first_commit"] is None)
                while True:
                    t1 = time.perf_counter()
                    group = next(groups, None)
                    done["encoding_s"] += time.perf_counter() - t1
                    if group is None:
                        break
                    positions, vecs = group
                    if vecs.shape[1] != task.dim:  # a remote endpoint may change its answer mid-run
                        raise BadRequest(f"{spec.model_identity} returned {vecs.shape[1]}-dimension vectors; "
                                         f"target {spec.target!r} holds {task.dim}")
                    now = db.utcnow()
                    rows = [{"source_id": todo[p][0], "embedding": db.encode_for(tables.target, v),
                             "model": spec.model_identity, "content_hash": todo[p][2], "embedded_at": now}
                            for p, v in zip(positions, vecs)]
                    with engine.begin() as conn:
                        db.upsert(conn, tables.target, rows)
                    if done["first_commit"] is None and hold:
                        _hold_while_exists(hold)
                    done["first_commit"] = done["first_commit"] or time.time()
                    done["embedded"] += len(rows)

        for index, after, hi in ranges:
            t0, done = time.perf_counter(), {"embedded": 0, "removed": 0, "first_commit": None, "encoding_s": 0.0}
            ride(embed, after, hi, done)
            yield {"index": index, **done, "seconds": time.perf_counter() - t0}

    return run


def _through_outages(databases: tuple[Engine, ...], attempt: Callable[..., T], *args, **kwargs) -> T:
    """attempt(*args, **kwargs), again while a database it uses (the run's; the driver's registry too, which may be
    on another server) fails over or restarts, for up to EMBEDDECK_DB_OUTAGE_S from its first failure. A task's
    attempt is one key range, which a repeat does again (upserts; the rows it committed are skipped); the driver's
    are its planning, done again whole, and statements."""
    deadline = None
    while True:
        try:
            return attempt(*args, **kwargs)
        except (DBAPIError, Unavailable) as exc:
            deadline = deadline or time.monotonic() + Settings().number("EMBEDDECK_DB_OUTAGE_S")
            # Unavailable: a connection that failed, its cause not kept; waited for while a database does not answer.
            away = (db.transient(exc, *databases) if isinstance(exc, DBAPIError)
                    else not all(db.answers(engine) for engine in databases))
            if time.monotonic() >= deadline or not away:
                raise
            log.warning("a database is unavailable (%s); trying again", type(getattr(exc, "orig", exc)).__name__)
            for engine in databases:
                engine.dispose()  # its pooled connections are to the server that went away
            time.sleep(min(OUTAGE_POLL_S, max(0.0, deadline - time.monotonic())))


class _ProgressWatcher(threading.Thread):
    """Turns a cancel request into job cancels every 2 s from the run's start, and renews the run's heartbeat and
    the count of executors its application holds; once the run embeds (publish_from) it publishes rows done and
    rows/s with them."""

    def __init__(self, sc, registry: Registry, run_id: str, spec: RunSpec, executors: Callable[[], int | None] | None):
        super().__init__(daemon=True)
        self.sc, self.registry, self.run_id = sc, registry, run_id
        self.engine, self.target, self.since = db.engine_for(spec.db_url), None, None
        self.stop_event = threading.Event()
        self.cancelled = False
        self.samples: list[tuple[float, int]] = []
        self.executors, self.reported, self.none_since = executors, None, None

    def publish_from(self, since, target=None) -> None:
        """Count the rows embedded (into target, once named) since `since` from now on; None: the heartbeat alone."""
        self.target = self.target if target is None else target
        self.since = since

    def sample(self) -> int:
        done = db.count_embedded_since(self.engine, self.target, self.since)
        self.samples.append((time.monotonic(), done))
        self.registry.progress(self.run_id, done, rate(self.samples))
        return done

    def rows_done_at_failure(self) -> int:
        """Rows done by a run that failed: the last count published where the target can no longer be counted
        (dropped under the run), whose error would have replaced the run's own."""
        try:
            return self.sample()
        except (DBAPIError, Unavailable):  # the database or the registry is what failed the run
            return self.samples[-1][1] if self.samples else 0

    def report_executors(self) -> None:
        count = self.executors() if self.executors else None
        if count == 0:  # reported once it lasts: every application starts with none for a moment
            self.none_since = self.none_since or time.monotonic()
            if time.monotonic() - self.none_since < NO_EXECUTOR_GRACE_S:
                return
        else:
            self.none_since = None
        if count != self.reported:
            self.registry.set_executors(self.run_id, count)
            self.reported = count

    def run(self) -> None:
        while not self.stop_event.wait(PROGRESS_EVERY_S):
            try:
                self.report_executors()
                if self.since is not None:
                    self.sample()
                else:  # planning, maybe for minutes while workers start: the heartbeat still says this driver lives
                    self.registry.beat(self.run_id)
                run = self.registry.get(self.run_id)
                if run is not None and run.cancel_requested:
                    # At every tick: a cancel can come before the run's first job (it is watched from its start).
                    self.cancelled = True
                    self.sc.cancelJobGroup(self.run_id)
            except Exception as exc:  # progress must never kill the run it reports on
                log.warning("progress update failed: %s", exc)


SHUT_DOWN = "because SparkContext was shut down"


def spark_error_message(exc: BaseException) -> str:
    """The root cause of a failed run in one or two lines: our own error's message, else the
    database or Python error at the bottom of Spark's JVM stack trace."""
    if isinstance(exc, EmbedDeckError):
        return str(exc)
    text = str(exc)
    if SHUT_DOWN in text:  # a Py4J error whose first line names only the JVM call it interrupted
        return ("the run's Spark application stopped while the run was in flight (its run service or driver was "
                "stopped, or died): launch it again; it embeds only what is missing")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("OperationalError", "IntegrityError", "ProgrammingError", "Error:", "Exception:"):
        for ln in reversed(lines):
            if marker in ln and not ln.startswith("at "):
                return ln.removeprefix(": ")[:2000]
    return (lines[0] if lines else type(exc).__name__)[:2000]


def _record_marks(registry: Registry, run_id: str, marks: dict[str, float], scanned: list[dict],
                  embedded: list[dict]) -> None:
    """Store the start-up marks as seconds since launch (the run's creation)."""
    run = registry.get(run_id)
    launched = run.created_at.replace(tzinfo=dt.UTC).timestamp()
    workers = [r["marks"] for r in scanned if r.get("marks")]
    if workers:
        first = min(workers, key=lambda m: m["model_ready"])
        marks = marks | {k: first[k] for k in ("worker_started", "model_ready")}
        marks["model_load_s"] = first["model_load_s"]
    commits = [r["first_commit"] for r in embedded if r.get("first_commit")]
    if commits:
        marks["first_commit"] = min(commits)
    if embedded:  # how much of the embedding job's core-seconds its tasks spent on rows
        marks["tasks_busy_s"] = sum(r["seconds"] for r in embedded)
        marks["tasks_encoding_s"] = sum(r["encoding_s"] for r in embedded)
    registry.set_timings(run_id, {k: v if k.endswith("_s") else v - launched for k, v in marks.items()})


def key_ranges(engine: Engine, tables: db.Tables, rows: int, parts: int) -> list[plan.KeyRange]:
    """`parts` key ranges over the source's first `rows` rows in id order, cut where the rows divide evenly."""
    # Not where the ids do: one id far beyond the rest put every other row in the first range, and one task did
    # all the work (1,100 rows/s on two cores instead of 1,900).
    return plan.ranges_ending_at(db.ids_at(engine, tables.source, tables.id_col, plan.split_ends(rows, parts)))


def execute(sc, spec: RunSpec, registry: Registry, run_id: str, marks: dict[str, float] | None = None,
            executors: Callable[[], int | None] | None = None) -> str:
    """Run the whole job on an existing SparkContext; returns the final state, or raises what failed it (recorded).

    marks: epoch times the caller already knows (driver_started, app_ready), completed here; executors: how many
    executors the application holds now (None where the driver runs the tasks), recorded for the doors.
    """
    # Watched from the start: reading a large source's counts and ids takes a while before planning, and a reader on
    # another host fails a run whose heartbeat is a minute old.
    # The driver's database steps, the registry's reads and writes among them (each idempotent), wait out an outage.
    ride = functools.partial(_through_outages, (db.engine_for(spec.db_url), registry.engine))
    watcher = _ProgressWatcher(sc, registry, run_id, spec, executors)
    watcher.start()
    try:
        return _execute(sc, spec, registry, run_id, dict(marks or {}), watcher, ride)
    except Exception as exc:
        # Recorded here, where the end waits out the registry too: a database away for longer than the window
        # fails the run, and on ACA the registry is that database (the caller's end of it had failed with it).
        try:
            ride(registry.finish, run_id, FAILED, error=spark_error_message(exc))
        except (DBAPIError, Unavailable) as lost:
            log.warning("run %s failed, and its end was not recorded: %s", run_id, lost)
        raise  # what failed the run, for the caller to record where the registry did not take it
    finally:
        watcher.stop_event.set()


def _prepare(spec: RunSpec, cores: int) -> tuple:
    """(engine, tables, endpoint, vector size, target, rows, key ranges) of a run, its target made where missing;
    BadRequest where its id column is no key. Statements only: done again whole while the database is away."""
    engine = db.check_connection(spec.db_url)
    tables = db.inspect_run(engine, spec)
    endpoint = endpoints.resolve(spec.endpoint) if spec.endpoint else None
    dim = (get_encoder(spec.model, endpoint=endpoint.url, api_key=endpoint.api_key, name=endpoint.name).dim
           if endpoint else model_dim(spec.model))
    target = db.ensure_target(engine, spec, tables, dim)
    db.record_target(engine, spec)
    rows, without_id = db.id_counts(engine, tables.source, tables.id_col)
    if without_id:
        raise BadRequest(f"id column {spec.id_column!r} of {spec.source!r} is NULL in {without_id} rows. "
                         f"{ONE_ROW_PER_ID}")
    misfits = db.misfit_ids(engine, tables.source, tables.id_col)
    if misfits:
        kind = "integers" if db.is_integer_type(tables.id_col.type) else "text"
        raise BadRequest(f"id column {spec.id_column!r} of {spec.source!r} is declared {tables.id_col.type}, but "
                         f"{misfits[0]} of its ids are not {kind} (such as {misfits[1]}): SQLite keeps any value in "
                         f"any column, a target's key only its own kind. Make them so, or key the run by another "
                         f"column.")
    rows = min(rows, spec.limit_rows or rows)
    if not rows:
        return engine, tables, endpoint, dim, target, 0, []
    parts = spec.partitions or plan.default_partitions(cores, rows)
    return engine, tables, endpoint, dim, target, rows, [(r.index, r.after, r.hi)
                                                        for r in key_ranges(engine, tables, rows, parts)]


def _execute(sc, spec: RunSpec, registry: Registry, run_id: str, marks: dict[str, float],
             watcher: _ProgressWatcher, ride: Callable) -> str:
    # Spark's UI names our jobs by these, instead of by the thread that submitted them.
    title = f"{spec.source} \u2192 {spec.target} ({run_id})"
    sc.setJobGroup(run_id, f"embed {title}", interruptOnCancel=True)
    engine, tables, endpoint, dim, target, rows, ranges = ride(_prepare, spec, sc.defaultParallelism)
    if not rows:  # an emptied source leaves its target empty too
        ride(registry.start, run_id, 0, 0)
        removed = ride(db.delete_orphans, engine, tables.id_col, target)
        ride(registry.finish, run_id, SUCCEEDED, rows_done=0, rows_removed=removed)
        return SUCCEEDED
    # A broadcast, not a file Spark's file server keeps offering: executors that join the run service later
    # would fetch every file ever added, and a destroyed broadcast is gone from every executor.
    secrets = sc.broadcast({"db_url": spec.db_url, "api_key": endpoint.api_key if endpoint else None})
    task = TaskPlan(spec.with_db_url(""), secrets, endpoint.url if endpoint else None, dim)

    try:
        ride(registry.set_phase, run_id, "planning")
        # Plain RDDs: the tasks read the database themselves, so Spark SQL and Arrow would only add
        # their start-up cost (seconds per run) and carry nothing.
        sc.setJobDescription(f"plan {title}")
        try:
            scanned = sc.parallelize(ranges, len(ranges)).mapPartitions(scan_partitions(task)).collect()
        except Exception:
            if not watcher.cancelled:
                raise
            ride(registry.finish, run_id, CANCELLED, error="cancelled by request before embedding started")
            return CANCELLED
        _raise_task_error(scanned)
        marks["planned"] = time.time()
        total = sum(r["needed"] for r in scanned)
        skipped = sum(r["empty"] + r["current"] for r in scanned)
        work = [(r["index"], r["after"], r["hi"]) for r in scanned if r["needed"] or r["emptied"]]
        ride(_record_marks, registry, run_id, marks, scanned, [])
        if ride(registry.get, run_id).cancel_requested:
            ride(registry.finish, run_id, CANCELLED, error="cancelled by request before embedding started")
            return CANCELLED
        since = db.utcnow()
        if not ride(registry.start, run_id, total, skipped):
            return ride(registry.get, run_id).state
        log.info("run %s: %d rows to embed in %d ranges, %d skipped", run_id, total, len(work), skipped)
        watcher.publish_from(since, target)
        t0, removed = time.monotonic(), 0
        try:
            if work:
                ride(registry.set_phase, run_id, "embedding")
                sc.setJobDescription(f"embed {title}")
                embedded = sc.parallelize(work, len(work)).mapPartitions(embed_partitions(task)).collect()
                _raise_task_error(embedded)
                removed = sum(r["removed"] for r in embedded)
                marks["embed_job_s"] = time.monotonic() - t0
                busy = sum(r["seconds"] for r in embedded)
                log.info("run %s: %d tasks busy %.1f s in all (%.0f %% of it encoding), %.1f s the longest, "
                         "over %.1f s on %d cores", run_id, len(embedded), busy,
                         100 * sum(r["encoding_s"] for r in embedded) / max(busy, 1e-9),
                         max(r["seconds"] for r in embedded), time.monotonic() - t0, sc.defaultParallelism)
                ride(_record_marks, registry, run_id, marks, scanned, embedded)
        except Exception as exc:
            watcher.stop_event.set()
            done = watcher.rows_done_at_failure()
            state, error = ((CANCELLED, "cancelled by request") if watcher.cancelled
                            else (FAILED, spark_error_message(exc)))
            ride(registry.finish, run_id, state, error=error, rows_done=done)
            return state
        done = ride(watcher.sample)
        elapsed = time.monotonic() - t0
        # Heartbeats only from here: removing the vectors of rows gone from a large source can take minutes, and a
        # reader on another host fails a run whose heartbeat is a minute old.
        watcher.publish_from(None)
        if not spec.limit_rows:  # a run over the whole table: the target keeps no vector of a row gone from it
            removed += ride(db.delete_orphans, engine, tables.id_col, target)
        watcher.stop_event.set()
        ride(registry.finish, run_id, SUCCEEDED, rows_done=done, rows_per_s=done / elapsed if elapsed > 0 else 0.0,
             rows_removed=removed)
        return SUCCEEDED
    finally:
        watcher.stop_event.set()
        secrets.destroy()
