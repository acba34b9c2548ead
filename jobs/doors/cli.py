"""`python -m jobs <verb>`: run, status, list, cancel, search, seed-demo.

Exit codes: 0 success, 1 the run failed, 2 bad input (one line on stderr naming the problem),
3 the run was cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from jobs import lifecycle
from jobs.core.errors import EmbedDeckError
from jobs.core.plan import shown_id
from jobs.core.processes import STOP_SIGNALS
from jobs.core.progress import eta_seconds, format_duration
from jobs.core.settings import Settings
from jobs.core.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL, RunSpec
from jobs.core.texts import one_line
from jobs.store import connections, db
from jobs.store.registry import CANCELLED, SUCCEEDED, WAITING, Registry, Run

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CANCELLED = 0, 1, 2, 3

NO_EXECUTOR = ("its Spark application holds no executor, and it goes on once it gets one: a worker must have free "
               "cores and at least EMBEDDECK_EXECUTOR_MEMORY of memory (none is alive, other applications hold the "
               "cores, or the workers are too small)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs", description="EmbedDeck embedding runs")
    verbs = parser.add_subparsers(dest="verb", required=True)

    run = verbs.add_parser("run", help="start an embedding run")
    run.add_argument("--db", default=None, help="a configured connection's name (its URL, password included, "
                                                 "then never shows in ps) or a SQLAlchemy URL; default "
                                                 "$EMBEDDECK_DB_URL or embedded SQLite")
    run.add_argument("--source", required=True, help="a table or view; `schema.name` outside the default schema")
    run.add_argument("--id-column", required=True, help="the source's key: an integer, text or UUID column")
    run.add_argument("--text-column", required=True)
    run.add_argument("--target", required=True)
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--master", default=None, help="local[N] or spark://host:port (default: "
                                                     "$EMBEDDECK_SPARK_MASTER, else the run service's master "
                                                     "when one is up, else local[*])")
    run.add_argument("--mode", default="incremental", choices=["incremental", "full"])
    run.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    run.add_argument("--chunk-rows", type=int, default=RunSpec.chunk_rows)
    run.add_argument("--partitions", type=int, default=None)
    run.add_argument("--endpoint", default=None,
                     help="a configured remote endpoint's name (its key goes to it alone), or an OpenAI-compatible "
                          "embeddings URL (sent no key unless it is a configured endpoint's)")
    run.add_argument("--limit-rows", type=int, default=None, help="embed only the first N rows by id")
    run.add_argument("--detach", action="store_true", help="print the run id and return at once")

    status = verbs.add_parser("status", help="state and progress of one run")
    status.add_argument("run_id")
    status.add_argument("--json", action="store_true")

    lst = verbs.add_parser("list", help="all runs, newest first")
    lst.add_argument("--json", action="store_true")

    cancel = verbs.add_parser("cancel", help="cancel an active run")
    cancel.add_argument("run_id")

    search = verbs.add_parser("search", help="top-k rows most similar to a query")
    search.add_argument("--db", default=None)
    search.add_argument("--target", required=True)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--model", default=None, help="query model (default: the stored vectors' model)")
    search.add_argument("--json", action="store_true")
    search.add_argument("query")

    serve = verbs.add_parser("serve", help="start the trigger HTTP API (token from $EMBEDDECK_API_TOKEN)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8888)

    seed = verbs.add_parser("seed-demo", help="create the demo products table if missing")
    seed.add_argument("--db", default=None)
    seed.add_argument("--rows", type=int, default=None)
    return parser


def database(value: str | None) -> str:
    """--db: a configured connection's URL by its name, else the URL given, else the default database."""
    if not value:
        return Settings().db_url
    return connections.configured().get(value, value)


def progress_line(run: Run) -> str:
    """One line: state, rows done/total, rows/s, ETA."""
    total = run.rows_total
    pct = f"{100 * run.rows_done / total:5.1f}%" if total else "  —  "
    eta = eta_seconds(total, run.rows_done, run.rows_per_s) if run.state == "running" else None
    return (f"{run.run_id} {run.state:<9} {pct} {run.rows_done}/{total if total is not None else '?'} rows"
            f"  {run.rows_per_s:7.1f} rows/s  ETA {format_duration(eta)}  skipped {run.rows_skipped}"
            + (f"  removed {run.rows_removed}" if run.rows_removed else "")
            + ("  (no executor yet)" if run.waits_for_executor else ""))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _already_cancelling(*_) -> None:
    # os.write, not print: a handler that prints while another print is under way raises "reentrant call".
    os.write(2, b"already cancelling: waiting for the run to stop\n")


def follow(registry: Registry, run_id: str, out=sys.stderr) -> Run:
    """Follow a run until it ends, drawing a progress line on a terminal; Ctrl-C, SIGTERM and SIGHUP cancel it."""

    def draw(run: Run) -> None:
        if out.isatty():
            out.write("\r" + progress_line(run) + ("   " if run.active else "\n"))
            out.flush()

    # SIGTERM (a scheduler's timeout, a stopped job) and SIGHUP (its terminal closed) ended this process alone: the
    # run's driver, in a session of its own, went on unwatched, and a run waiting for a slot waited for a reader.
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    try:
        return lifecycle.wait(run_id, registry, on_tick=draw)
    except KeyboardInterrupt:
        # A second stop while the first one's cancel is under way would end this process in a traceback, its run's
        # end unreported: the cancel is already on its way, so it is only told to wait.
        for sig in STOP_SIGNALS:
            signal.signal(sig, _already_cancelling)
        lifecycle.cancel_and_wait(run_id, registry)
        return registry.get(run_id)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_code(run: Run) -> int:
    return {SUCCEEDED: EXIT_OK, CANCELLED: EXIT_CANCELLED}.get(run.state, EXIT_FAILED)


def cmd_run(args) -> int:
    spec = RunSpec(db_url=database(args.db), source=args.source, id_column=args.id_column,
                   text_column=args.text_column, target=args.target, model=args.model,
                   batch_size=args.batch_size, chunk_rows=args.chunk_rows, partitions=args.partitions,
                   limit_rows=args.limit_rows, endpoint=args.endpoint, mode=args.mode,
                   master=lifecycle.resolve_master(args.master), launched_by="cli")
    registry = Registry()
    run_id = lifecycle.launch(spec, registry)
    # Its URL stays on this host, so only a reader here starts it: one that detaches must know which.
    waits = registry.get(run_id).phase == WAITING
    if args.detach:
        print(run_id)
        if waits:
            print(f"run {run_id} waits for a slot (EMBEDDECK_MAX_ACTIVE_RUNS runs are active); it starts when one "
                  "frees if the dashboard, the API or the autoscaler runs on this host, else at the next `status` or "
                  "`list` here", file=sys.stderr)
        return EXIT_OK
    print(f"run {run_id} {'waits for a slot' if waits else 'started'}", file=sys.stderr)
    run = follow(registry, run_id)
    print(progress_line(run))
    if run.error:
        print(f"error: {run.error}", file=sys.stderr)
    return exit_code(run)


def cmd_status(args) -> int:
    run = lifecycle.get(args.run_id, Registry())
    if args.json:
        print(json.dumps(run.as_dict(), indent=2))
    else:
        print(progress_line(run))
        if run.waits_for_executor:
            print(f"waiting: {NO_EXECUTOR}; `python -m cluster status` shows the workers")
        if run.error:
            print(f"error: {run.error}")
    return EXIT_OK


def cmd_list(args) -> int:
    registry = Registry()
    lifecycle.refresh(registry)
    runs = registry.list()
    if args.json:
        print(json.dumps([r.as_dict() for r in runs], indent=2))
    else:
        for run in runs:
            print(f"{run.run_id}  {run.state:<9} {run.rows_done:>8} rows  {run.source} -> {run.target}"
                  f"  {run.model}  by {run.launched_by}")
    return EXIT_OK


def cmd_cancel(args) -> int:
    print(lifecycle.cancel_and_wait(args.run_id, Registry()))
    return EXIT_OK


def cmd_search(args) -> int:
    from jobs.embed.search import search, timings_line

    result = search(database(args.db), args.target, args.query, k=args.k, model=args.model)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps([{"id": h.id, "score": round(h.score, 6), "text": h.text} for h in result.hits]))
    else:
        for rank, hit in enumerate(result.hits, 1):
            # Texts and keys come from the data: as they are, they could split rows or drive the terminal. A key
            # is shown exactly, quoted with its escapes where it holds a character that does not print (a CSV's
            # `T-1\r` had been shown as T-1, which no query finds).
            key = hit.id if not isinstance(hit.id, str) or hit.id.isprintable() else shown_id(hit.id)
            print(f"{rank:>3}. {hit.score:.4f}  [{key}]  {one_line(hit.text or '', 100)}")
        print(f"model {result.model} · {timings_line(result)}", file=sys.stderr)
    return EXIT_OK


def cmd_seed_demo(args) -> int:
    from jobs.store.demo import DEMO_ROWS, seed_demo

    url, rows = database(args.db), DEMO_ROWS if args.rows is None else args.rows
    count = seed_demo(url, n=rows)
    kept = "" if count == rows else " (the table was there already: --rows fills only a missing one)"
    print(f"products: {count} rows in {db.redact_url(url)}{kept}")
    return EXIT_OK


def cmd_serve(args) -> int:
    from jobs.doors.api import serve

    Settings().check_values()  # met at start, not as a 400 on the first request that reads one
    return serve(args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": cmd_run, "status": cmd_status, "list": cmd_list, "cancel": cmd_cancel,
               "search": cmd_search, "seed-demo": cmd_seed_demo, "serve": cmd_serve}[args.verb]
    try:
        return handler(args)
    except EmbedDeckError as exc:  # bad input, an unknown run, an unreachable database or master
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
