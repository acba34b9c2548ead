"""The backend chosen by configuration: EMBEDDECK_CLUSTER_BACKEND=local (default) or aca."""

from __future__ import annotations

import threading

from cluster.aca import AcaBackend, AcaTarget
from cluster.backend import Backend
from cluster.local import LocalCluster
from cluster.spark_rest import MasterState
from jobs.core.errors import BadRequest
from jobs.core.settings import Settings
from jobs.spark import run_service


def configured() -> Backend:
    """The cluster this deployment drives: local worker processes, or the ACA worker app's replicas."""
    kind = Settings().raw("EMBEDDECK_CLUSTER_BACKEND")
    if kind == "local":
        return LocalCluster()
    if kind == "aca":
        return AcaBackend(AcaTarget.from_env())
    raise BadRequest(f"EMBEDDECK_CLUSTER_BACKEND must be local or aca, not {kind!r}")


def stop_all(backend: Backend) -> None:
    """Stop the run service and the backend's daemons together: each Spark JVM takes about 2 s to exit (the
    service 2.5 s, a master and two workers 1.9 s), so neither waits for the other."""
    service = threading.Thread(target=run_service.stop)
    service.start()
    try:
        backend.down()
    finally:
        service.join()


def start_all(backend: Backend, workers: int = 0) -> tuple[MasterState, dict]:
    """Start the master (and n workers) with its run service, whose master is where runs that name none go: a
    master started alone left them on local[*], off the cluster and its workers."""
    state = backend.up(workers)
    return state, run_service.start(backend.master_url())
