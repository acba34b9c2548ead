"""Table rows and labels the pages show, built from core objects without Streamlit."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from cluster.spark_rest import MasterState
from jobs.core.autoscale import ScalingSettings
from jobs.core.progress import eta_seconds, format_duration
from jobs.core.settings import size_mib
from jobs.store.registry import WAITING, Run

if TYPE_CHECKING:  # a hint only: the pages without search need not import it
    from jobs.embed.search import Hit

# Every ASCII punctuation character, each of which CommonMark lets a backslash escape.
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def literal(text: object) -> str:
    """text escaped for the Markdown that Streamlit renders in alerts, captions and st.table cells, so that it shows
    as written: a price of $5 and $10 had become math, __x__ bold, :smile: an emoji, [a](b) a link."""
    return _PUNCTUATION.sub(r"\\\1", str(text))


# Characters of a hit's text the Search page shows: a text may hold 65,536, and 50 such hits would make 3 MB of page.
SHOWN_TEXT_CHARS = 1000


def _preview(text: str) -> str:
    return literal(text[:SHOWN_TEXT_CHARS]) + (" …" if len(text) > SHOWN_TEXT_CHARS else "")


def hit_rows(hits: list[Hit]) -> list[dict]:
    """The search hits as st.table rows: score, id and the first SHOWN_TEXT_CHARS of the source text (… where cut),
    escaped, as Streamlit renders Markdown there."""
    return [{"score": round(h.score, 4), "id": literal(h.id) if isinstance(h.id, str) else h.id,
             "text": None if h.text is None else _preview(h.text)} for h in hits]


def run_row(run: Run) -> dict:
    """One line of the runs table."""
    total = run.rows_total
    return {
        "run": run.run_id, "state": run.state, "done": run.rows_done,
        "total": total if total is not None else None, "skipped": run.rows_skipped,
        "rows/s": round(run.rows_per_s, 1), "duration": format_duration(run.duration_s()),
        "model": run.model, "source → target": f"{run.source} → {run.target}", "launched by": run.launched_by,
    }


def runs_by_app(runs: list[Run]) -> dict[str, list[str]]:
    """Running runs grouped by their Spark UI: runs on the run service share one application."""
    apps: dict[str, list[str]] = {}
    for run in runs:
        if run.state == "running" and run.ui_url:
            apps.setdefault(run.ui_url, []).append(run.run_id)
    return apps


def run_progress(run: Run) -> tuple[float, str]:
    """Fraction done and the caption under the progress bar."""
    total = run.rows_total or 0
    frac = min(1.0, run.rows_done / total) if total else (1.0 if not run.active else 0.0)
    eta = eta_seconds(run.rows_total, run.rows_done, run.rows_per_s) if run.state == "running" else None
    phase = run.phase or run.state
    return frac, (f"{phase}: {run.rows_done:,} / {total:,} rows · {run.rows_per_s:.1f} rows/s · "
                  f"ETA {format_duration(eta)} · {run.rows_skipped:,} skipped"
                  + (f" · {run.rows_removed:,} vectors removed" if run.rows_removed else ""))


# KEDA polls the controller every 30 s, and a serverless GPU replica pulls its image and loads its model.
NEW_WORKER_WAIT = "a new worker registers within seconds locally, within minutes on Container Apps"


def waiting_for_workers(run: Run, master: MasterState, settings: ScalingSettings, executor_memory: str) -> str | None:
    """Why a run in flight on this cluster makes no progress (planning or embedding): its master has no alive worker,
    or its application holds no executor although workers are alive; None otherwise. Spark holds its jobs until an
    executor comes, so it goes on when one does. executor_memory: EMBEDDECK_EXECUTOR_MEMORY."""
    if not run.active or run.phase == WAITING or not master.reachable:
        return None
    if master.alive_workers > 0:
        return _no_executor(master, executor_memory) if run.waits_for_executor else None
    waits = "This run waits: its cluster has no alive worker, and it resumes when one registers."
    if not settings.autoscale and settings.desired == 0:
        return f"{waits} Scaling is manual at 0 workers: set a count on the Cluster page, or switch autoscaling on."
    if not settings.autoscale:
        return (f"{waits} Scaling is manual at {settings.desired} worker{'' if settings.desired == 1 else 's'}, "
                f"none alive yet: {NEW_WORKER_WAIT}; if none comes, the Cluster page shows why.")
    if settings.max_workers == 0:
        return f"{waits} The autoscaler may start none (its maximum is 0): raise it on the Cluster page."
    return f"{waits} The autoscaler starts workers for it (at most {settings.max_workers}): {NEW_WORKER_WAIT}."


def _no_executor(master: MasterState, executor_memory: str) -> str:
    """Why alive workers give an application no executor: no free core, or too little free memory."""
    waits = "This run waits: its Spark application holds no executor, and it goes on once it gets one."
    free = [w for w in master.workers if w.state == "ALIVE" and w.cores > w.cores_used]
    if not free:
        return (f"{waits} The cores of the cluster's {master.alive_workers} alive worker"
                f"{'' if master.alive_workers == 1 else 's'} are all held by other applications: the Spark master's "
                "UI (linked on the Cluster page) lists them.")
    if all(w.memory_mb - w.memory_used_mb < size_mib(executor_memory) for w in free):
        return (f"{waits} The workers with free cores have less memory free than an executor asks "
                f"(EMBEDDECK_EXECUTOR_MEMORY={executor_memory}): lower it, or give the workers more.")
    return f"{waits} A worker has free cores and memory: Spark offers them within seconds."


def telemetry_rows(readings: list) -> list[dict]:
    """One row per GPU, or one CPU/memory row for a worker without a GPU, labelled as such; the GPU-only columns
    (temperature, power) only where some worker has a GPU, rather than a column of "None" on a CPU cluster."""
    gpu_only = {"temp °C": None, "power W": None} if any(r.gpus for r in readings) else {}
    rows = []
    for r in readings:
        if r.gpus:
            rows += [{"worker": r.worker, "kind": f"GPU {g.index} {g.name}", "utilisation %": g.utilisation_pct,
                      "memory MB": f"{g.memory_used_mb:.0f} / {g.memory_total_mb:.0f}",
                      "temp °C": g.temperature_c, "power W": g.power_w, "stale": r.stale, "source": r.source}
                     for g in r.gpus]
        else:
            measure = "PSS" if r.source == "worker" else "working set"  # Azure Monitor's, on ACA
            rows.append({"worker": r.worker, "kind": "CPU (no GPU on this worker)",
                         "utilisation %": round(r.cpu_pct, 1), "memory MB": f"{r.memory_mb:.0f} {measure}",
                         **gpu_only, "stale": r.stale, "source": r.source})
    return rows


def decision_rows(events: list[dict]) -> list[dict]:
    """The scaling decisions as a table, newest first, each with its reason."""
    return [{"at (UTC)": e["at"].strftime("%H:%M:%S"), "workers": f"{e['from_workers']} → {e['to_workers']}",
             "by": e["source"], "reason": e["reason"]} for e in reversed(events)]
