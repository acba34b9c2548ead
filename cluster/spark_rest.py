"""Spark master JSON and application REST API client; never raises into a caller's UI."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.spark.http_json import TIMEOUT_S, get_json, master_json


@dataclass
class WorkerInfo:
    id: str
    host: str
    port: int
    state: str
    cores: int
    cores_used: int
    memory_mb: int
    memory_used_mb: int
    webui: str


@dataclass
class MasterState:
    """What the standalone master reports about itself, its workers and applications."""

    reachable: bool
    url: str = ""
    status: str = "DOWN"
    alive_workers: int = 0
    cores: int = 0
    cores_used: int = 0
    memory_mb: int = 0
    memory_used_mb: int = 0
    workers: list[WorkerInfo] = field(default_factory=list)
    active_apps: list[dict] = field(default_factory=list)
    error: str | None = None


def parse_master(data: dict) -> MasterState:
    """Master /json/ → MasterState; DEAD workers are listed but never counted as capacity."""
    workers = [WorkerInfo(w.get("id", ""), w.get("host", ""), int(w.get("port", 0)), w.get("state", "?"),
                          int(w.get("cores", 0)), int(w.get("coresused", 0)), int(w.get("memory", 0)),
                          int(w.get("memoryused", 0)), w.get("webuiaddress", ""))
               for w in data.get("workers", [])]
    alive = [w for w in workers if w.state == "ALIVE"]
    return MasterState(
        reachable=True, url=data.get("url", ""), status=data.get("status", "?"),
        alive_workers=int(data.get("aliveworkers", len(alive))),
        cores=sum(w.cores for w in alive), cores_used=sum(w.cores_used for w in alive),
        memory_mb=sum(w.memory_mb for w in alive), memory_used_mb=sum(w.memory_used_mb for w in alive),
        workers=workers,
        active_apps=[{"id": a.get("id"), "name": a.get("name"), "cores": a.get("cores"),
                      "state": a.get("state"), "starttime": a.get("starttime")}
                     for a in data.get("activeapps", [])],
    )


def master_state(webui: str, timeout: float = TIMEOUT_S) -> MasterState:
    """The master's state from its web UI address (http://127.0.0.1:8080)."""
    reply = master_json(webui, timeout)
    if not reply.ok:
        return MasterState(reachable=False, error=reply.error)
    return parse_master(reply.data)


@dataclass
class AppStats:
    """Application REST figures for the dashboard."""

    reachable: bool
    app_id: str | None = None
    name: str | None = None
    executors: list[dict] = field(default_factory=list)
    active_tasks: int = 0
    completed_tasks: int = 0
    failed_tasks: int = 0
    task_time_ms: int = 0
    gc_time_ms: int = 0
    input_records: int = 0
    jobs: list[dict] = field(default_factory=list)
    stages: list[dict] = field(default_factory=list)
    error: str | None = None


def parse_app(app: dict, executors: list[dict], jobs: list[dict], stages: list[dict]) -> AppStats:
    """Application, executors, jobs and stages JSON → AppStats (driver excluded from executors)."""
    execs = [e for e in executors if e.get("id") != "driver"]
    return AppStats(
        reachable=True, app_id=app.get("id"), name=app.get("name"),
        executors=[{"id": e.get("id"), "host": e.get("hostPort"), "active": e.get("isActive"),
                    "cores": e.get("totalCores"), "active_tasks": e.get("activeTasks", 0),
                    "completed_tasks": e.get("completedTasks", 0), "failed_tasks": e.get("failedTasks", 0),
                    "task_time_ms": e.get("totalDuration", 0), "gc_time_ms": e.get("totalGCTime", 0)}
                   for e in execs],
        active_tasks=sum(e.get("activeTasks", 0) for e in executors),
        completed_tasks=sum(e.get("completedTasks", 0) for e in executors),
        failed_tasks=sum(e.get("failedTasks", 0) for e in executors),
        task_time_ms=sum(e.get("totalDuration", 0) for e in executors),
        gc_time_ms=sum(e.get("totalGCTime", 0) for e in executors),
        input_records=sum(s.get("inputRecords", 0) for s in stages),
        jobs=[{"id": j.get("jobId"), "description": j.get("description"), "name": j.get("name"),
               "status": j.get("status"),
               "tasks": j.get("numTasks"), "active": j.get("numActiveTasks"),
               "completed": j.get("numCompletedTasks"), "failed": j.get("numFailedTasks")} for j in jobs],
        stages=[{"id": s.get("stageId"), "status": s.get("status"), "description": s.get("description"),
                 "name": s.get("name"),
                 "tasks": s.get("numTasks"), "active": s.get("numActiveTasks"),
                 "completed": s.get("numCompleteTasks"), "failed": s.get("numFailedTasks")} for s in stages],
    )


def app_stats(ui: str, timeout: float = TIMEOUT_S) -> AppStats:
    """Figures of the first application served by a driver UI (http://127.0.0.1:4040)."""
    base = ui.rstrip("/") + "/api/v1/applications"
    apps = get_json(base, timeout)
    if not apps.ok or not apps.data:
        return AppStats(reachable=False, error=apps.error or "no application")
    app = apps.data[0]
    parts = [get_json(f"{base}/{app['id']}/{p}", timeout) for p in ("allexecutors", "jobs", "stages")]
    if not all(p.ok for p in parts):
        return AppStats(reachable=False, error=next(p.error for p in parts if not p.ok))
    return parse_app(app, *(p.data for p in parts))
