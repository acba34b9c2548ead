"""The backend chosen by configuration: EMBEDDECK_CLUSTER_BACKEND=local (default) or aca."""

from __future__ import annotations

import threading

from cluster.aca import AcaBackend, AcaTarget
from cluster.backend import Backend
from cluster.local import LocalCluster
from cluster.spark_rest import MasterState
from jobs import lifecycle
from jobs.core.errors import BadRequest
from jobs.core.settings import Settings
from jobs.spark import run_service
from jobs.spark.submit import same_master
from jobs.store.registry import Registry


def configured() -> Backend:
    """The cluster this deployment drives: local worker processes, or the ACA worker app's replicas."""
    kind = Settings().raw("EMBEDDECK_CLUSTER_BACKEND")
    if kind == "local":
        return LocalCluster()
    if kind == "aca":
        return AcaBackend(AcaTarget.from_env())
    raise BadRequest(f"EMBEDDECK_CLUSTER_BACKEND must be local or aca, not {kind!r}")


def stop_all(backend: Backend, registry: Registry | None = None) -> list[str]:
    """Cancel the runs of this cluster's master, then stop the run service and the backend's daemons together: each
    Spark JVM takes about 2 s to exit (the service 2.5 s, a master and two workers 1.9 s), so neither waits for the
    other. Returns the runs cancelled."""
    cancelled = _cancel_runs(backend, registry or Registry()) if backend.name == "local" else []
    service = threading.Thread(target=run_service.stop)
    service.start()
    try:
        backend.down()
    finally:
        service.join()
    return cancelled


def active_runs(backend: Backend, registry: Registry) -> list[str]:
    """The runs in flight on, or waiting for, the backend's master."""
    return [r.run_id for r in registry.list(active_only=True)
            if r.master and same_master(r.master, backend.master_url())]


def _cancel_runs(backend: Backend, registry: Registry) -> list[str]:
    """Cancel the runs in flight on (or waiting for) the master, and wait for them to end: stopped under them, they
    failed with Spark's 'SparkContext was shut down', and a waiting one would have been handed to a dead master.
    ACA's master lives in the controller app, which this never stops."""
    runs = active_runs(backend, registry)
    for run_id in runs:
        lifecycle.cancel(run_id, registry)
    for run_id in runs:
        lifecycle.wait(run_id, registry, every_s=0.5, timeout_s=lifecycle.CANCEL_GRACE_S + 10)
    return runs


def start_all(backend: Backend, workers: int | None = None) -> tuple[MasterState, dict]:
    """Start the master (scaled to n workers; None: a running one keeps its own) with its run service, whose master is
    where runs that name none go: a master started alone left them on local[*], off the cluster and its workers."""
    state = backend.up(workers)
    return state, run_service.start(backend.master_url())
