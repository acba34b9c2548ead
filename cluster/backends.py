"""The backend chosen by configuration: EMBEDDECK_CLUSTER_BACKEND=local (default) or aca."""

from __future__ import annotations

from cluster.aca import AcaBackend, AcaTarget
from cluster.backend import Backend
from cluster.local import LocalCluster
from jobs.core.errors import BadRequest
from jobs.core.settings import Settings


def configured() -> Backend:
    """The cluster this deployment drives: local worker processes, or the ACA worker app's replicas."""
    kind = Settings().raw("EMBEDDECK_CLUSTER_BACKEND")
    if kind == "local":
        return LocalCluster()
    if kind == "aca":
        return AcaBackend(AcaTarget.from_env())
    raise BadRequest(f"EMBEDDECK_CLUSTER_BACKEND must be local or aca, not {kind!r}")
