"""Watching an application's standalone master from its driver.

A standalone application that loses its master never registers with it again, even once it is back: it
keeps the executors it holds, and asks for none ever after. A run with no executor left then waited for
ever ("Initial job has not accepted any resources"), its driver alive, so nothing marked it failed.
"""

from __future__ import annotations

import time

from jobs.core.errors import Unavailable
from jobs.core.spec import in_process
from jobs.spark.submit import check_master

EVERY_S, MISSES = 2.0, 3  # a master that refuses connections for about 6 s is gone, not restarting its socket


def stopped(sc) -> bool:
    """Whether the application stopped (or its JVM is gone)."""
    try:
        return bool(sc._jsc.sc().isStopped())
    except Exception:
        return True


def executor_ids(sc) -> frozenset[str]:
    """The ids of the executors the application holds now."""
    return frozenset(filter(None, sc._jsc.sc().getExecutorIds().mkString(",").split(",")))


def executor_count(sc) -> int | None:
    """How many executors the application holds; None on an in-process master, whose driver runs the tasks."""
    return None if in_process(sc.master) else len(executor_ids(sc))


def lost(sc, every_s: float = EVERY_S, misses: int = MISSES) -> str | None:
    """Block while the application runs and its master answers; the master's error once `misses` checks in a row
    failed, or None once the application stopped. In-process masters are never lost."""
    if in_process(sc.master):
        return None
    missed, error = 0, ""
    while missed < misses:
        time.sleep(every_s)
        if stopped(sc):
            return None
        try:
            check_master(sc.master, timeout_s=every_s)
            missed = 0
        except Unavailable as exc:
            missed, error = missed + 1, str(exc)
    return error


def run_lost_message(error: str) -> str:
    """What a run that lost its master says, in the registry and on every door."""
    return (f"{error}. It went away while the run was in flight, and a Spark application never rejoins a master: "
            "start the cluster, then launch the run again; it embeds only what is missing")
