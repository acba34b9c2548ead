"""A run's own Spark driver: `spark-submit jobs/spark/driver.py --run-id ID` (client mode).

Started by jobs/spark/submit.py when no run service serves the master. The stored spec has a redacted
URL; the real one comes through this process's environment only (EMBEDDECK_RUN_DB_URL).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
import time

from jobs.core.processes import started_at
from jobs.core.settings import Settings
from jobs.core.spec import RunSpec
from jobs.embed.pipeline import execute, spark_error_message
from jobs.spark import master_watch
from jobs.spark.python_path import use_installed_pyspark
from jobs.spark.submit import app_conf
from jobs.store.registry import FAILED, SUCCEEDED, Registry

log = logging.getLogger("embeddeck.driver")


def _fail_when_stranded(sc, registry: Registry, run_id: str, every_s: float = master_watch.EVERY_S) -> None:
    """Once the master is lost, go on while executors remain (they finish the run without it); with none left the
    run can never get one: fail it by name and end this driver, which would otherwise wait for ever."""
    error = master_watch.lost(sc)
    if error is None:
        return
    log.warning("%s; the run goes on with the executors it holds", error)
    while not master_watch.stopped(sc):
        if not master_watch.executor_ids(sc):
            registry.finish(run_id, FAILED, error=master_watch.run_lost_message(error))
            log.error("run %s failed: %s, and the application holds no executor", run_id, error)
            os._exit(1)
        time.sleep(every_s)


def main(argv: list[str] | None = None) -> int:
    """Run one registered run to its end; exit 0 when it succeeded."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description="EmbedDeck Spark driver")
    parser.add_argument("--run-id", required=True)
    opts = parser.parse_args(argv)
    registry = Registry()
    run = registry.get(opts.run_id)
    if run is None:
        print(f"run {opts.run_id} is not in the registry", file=sys.stderr)
        return 2
    spec = RunSpec.from_json(run.spec_json).with_db_url(Settings().raw("EMBEDDECK_RUN_DB_URL") or "")
    marks = {"driver_started": started_at()}
    use_installed_pyspark()
    from pyspark import SparkContext

    # A bare SparkContext: the job uses no Spark SQL, whose session start costs seconds per run.
    sc = SparkContext(conf=app_conf(f"embeddeck-{opts.run_id}"))
    marks["app_ready"] = time.time()
    threading.Thread(target=_fail_when_stranded, args=(sc, registry, opts.run_id), daemon=True).start()
    try:
        state = execute(sc, spec, registry, opts.run_id, marks, functools.partial(master_watch.executor_count, sc))
    except Exception as exc:
        registry.finish(opts.run_id, FAILED, error=spark_error_message(exc))
        state = FAILED
    finally:
        sc.stop()
    return 0 if state == SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
