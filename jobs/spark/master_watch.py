"""Watching an application's standalone master from its driver.

A standalone application that loses its master never registers with it again, even once it is back: it
keeps the executors it holds, and asks for none ever after. A run with no executor left then waited for
ever ("Initial job has not accepted any resources"), its driver alive, so nothing marked it failed. A master
restarted within seconds is no better: the new one knows no application, and kills their executors as their workers
register with it again.
"""

from __future__ import annotations

import time
from urllib.parse import urlparse

from jobs.core.errors import Unavailable
from jobs.core.settings import Settings
from jobs.core.spec import in_process
from jobs.spark.http_json import master_json
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


def master_webui(master: str) -> str:
    """Where a spark://host:port master serves its web UI: that host, at EMBEDDECK_MASTER_WEBUI_PORT (where
    EmbedDeck's masters serve it, locally and on Container Apps)."""
    return f"http://{urlparse(master).hostname}:{Settings().integer('EMBEDDECK_MASTER_WEBUI_PORT')}"


def listed(webui: str, app_id: str, timeout_s: float) -> bool | None:
    """Whether the alive master at webui lists the application as active; None when nothing answers there as an
    alive master (no UI, not JSON, a standby master)."""
    reply = master_json(webui, timeout_s)
    if not reply.ok or not isinstance(reply.data, dict) or reply.data.get("status") != "ALIVE":
        return None
    return any(app.get("id") == app_id for app in reply.data.get("activeapps") or [])


def lost(sc, every_s: float = EVERY_S, misses: int = MISSES) -> str | None:
    """Block while the application runs and its master knows it. Why not: the master's error once `misses` checks
    in a row failed, or at once a restart, when the master that listed the application lists it no more; None once
    the application stopped. In-process masters are never lost."""
    if in_process(sc.master):
        return None
    webui, app_id = master_webui(sc.master), sc.applicationId
    # An answer without the application counts only from a UI seen listing it: another master may serve that port.
    # Asked at once, as a registered application is listed from its start: a restart in the first interval counts.
    seen, missed, error = listed(webui, app_id, every_s) is True, 0, ""
    while missed < misses:
        time.sleep(every_s)
        if stopped(sc):
            return None
        try:
            check_master(sc.master, timeout_s=every_s)
        except Unavailable as exc:
            missed, error = missed + 1, str(exc)
            continue
        missed = 0
        known = listed(webui, app_id, every_s)
        if known is False and seen and not stopped(sc):
            return f"Spark master {sc.master} restarted: it no longer lists application {app_id}"
        seen = seen or bool(known)
    return error


def run_lost_message(error: str) -> str:
    """What a run that lost its master says, in the registry and on every door."""
    return (f"{error}. It went away while the run was in flight, and a Spark application never rejoins a master: "
            "launch the run again once the cluster is up; it embeds only what is missing")
