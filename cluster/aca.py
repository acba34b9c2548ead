"""The cluster interface over Azure Container Apps: worker replicas, bounds, metrics, scaling events.

Replica counts are never driven by rewriting min/max (a template change makes a new revision and
replaces every running worker): the desired count is the autoscaler's, which the worker app's KEDA
metrics-api rule reads from the controller's /autoscale. Manual scaling records that count.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from cluster import spark_rest
from cluster.backend import Worker, configured_pricing
from jobs.core.cost import Pricing
from jobs.core.errors import BadRequest
from jobs.core.settings import Settings
from jobs.store import worker_readings

NEEDED = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_LOCATION")
METRICS = ["Replicas", "UsageNanoCores", "WorkingSetBytes"]
PER_REPLICA = ["UsageNanoCores", "WorkingSetBytes"]  # published with a replicaName dimension


@dataclass(frozen=True)
class AcaTarget:
    subscription_id: str
    resource_group: str
    worker_app: str = "embeddeck-worker"
    controller_app: str = "embeddeck-controller"
    region: str = "swedencentral"
    workspace_id: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AcaTarget:
        """The worker app to drive, from the environment; BadRequest naming what is missing."""
        settings = Settings(env)
        missing = [k for k in NEEDED if not settings.raw(k)]
        if missing:
            raise BadRequest("the Azure Container Apps backend needs " + ", ".join(missing)
                             + " (and credentials DefaultAzureCredential can find: az login, a managed"
                               " identity, or AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET)")
        return cls(settings.raw("AZURE_SUBSCRIPTION_ID"), settings.raw("AZURE_RESOURCE_GROUP"),
                   settings.raw("EMBEDDECK_ACA_WORKER"), settings.raw("EMBEDDECK_ACA_CONTROLLER"),
                   settings.raw("AZURE_LOCATION"), settings.raw("EMBEDDECK_LOG_WORKSPACE_ID"))

    @property
    def worker_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.App/containerApps/{self.worker_app}")


@dataclass
class MetricPoint:
    metric: str
    at: dt.datetime
    average: float | None
    maximum: float | None


class AcaBackend:
    """Workers are the replicas of the worker app's latest ready revision. A Backend."""

    name = "aca"

    def __init__(self, target: AcaTarget, credential=None, **client_kwargs):
        from azure.mgmt.appcontainers import ContainerAppsAPIClient

        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        self.target, self.credential, self.client_kwargs = target, credential, client_kwargs
        self.client = ContainerAppsAPIClient(credential, target.subscription_id, **client_kwargs)

    def master_url(self) -> str:
        return f"spark://{self.target.controller_app}:7077"

    @property
    def master_webui(self) -> str:
        return f"http://{self.target.controller_app}:8080"

    def master_state(self) -> spark_rest.MasterState:
        """The master in the controller app, as its own JSON tells (reached inside the environment)."""
        return spark_rest.master_state(self.master_webui)

    def pricing(self) -> Pricing:
        """A serverless GPU replica holds one GPU; the price is the region's published rate (deploy sets it)."""
        return configured_pricing("GPU", 1.0)

    def utilisation(self) -> list[worker_readings.Reading]:
        """CPU and memory per replica from Azure Monitor; GPU from the replicas' own readings on the share
        (Azure Monitor publishes no GPU metric for Container Apps). A replica Azure knows of that has not
        reported yet still gets a row."""
        readings = {r.worker: r for r in worker_readings.read_all(worker_readings.store_dir())}
        for replica, (cores, memory_bytes) in self.replica_usage().items():
            reading = readings.setdefault(replica, worker_readings.Reading(
                replica, replica, 0.0, gpu_note="no GPU reading from this replica yet"))
            reading.cpu_pct, reading.memory_mb = cores * 100.0, memory_bytes / 2**20
            reading.source = "Azure Monitor (CPU, memory)" + (", worker (GPU)" if reading.gpus else "")
        return list(readings.values())

    def replica_usage(self, minutes: int = 10) -> dict[str, tuple[float, float]]:
        """The latest cores in use and working-set bytes of each replica, split by Azure's replicaName."""
        from azure.monitor.querymetrics import MetricsClient

        client = MetricsClient(f"https://{self.target.region}.metrics.monitor.azure.com", self.credential,
                               **self.client_kwargs)
        results = client.query_resources(resource_ids=[self.target.worker_id],
                                         metric_namespace="Microsoft.App/containerApps", metric_names=PER_REPLICA,
                                         timespan=dt.timedelta(minutes=minutes), granularity=dt.timedelta(minutes=1),
                                         aggregations=["Average"], filter="replicaName eq '*'")
        usage: dict[str, list[float]] = {}
        for result in results:
            for metric in result.metrics:
                column = PER_REPLICA.index(metric.name)
                for series in metric.timeseries:
                    replica = next(iter(series.metadata_values.values()), None)
                    points = [p.average for p in series.data if p.average is not None]
                    if replica and points:
                        usage.setdefault(replica, [0.0, 0.0])[column] = points[-1]
        return {replica: (nano / 1e9, memory) for replica, (nano, memory) in usage.items()}

    def up(self, workers: int | None = None) -> spark_rest.MasterState:
        raise BadRequest("on Azure Container Apps the master runs in the controller app: deploy it with "
                         "`python -m cluster deploy`")

    def down(self) -> None:
        raise BadRequest("on Azure Container Apps, workers scale to zero by themselves; the controller app "
                         "is stopped with the Azure CLI or portal")

    def workers(self) -> list[Worker]:
        """Replicas of the active revision with their running state and start time."""
        t = self.target
        app = self.client.container_apps.get(t.resource_group, t.worker_app)
        revision = app.latest_ready_revision_name
        if not revision:
            return []
        replicas = self.client.container_apps_revision_replicas.list_replicas(t.resource_group, t.worker_app,
                                                                              revision)
        out = []
        for r in replicas.value or []:
            created = r.created_time
            containers = r.containers or []
            out.append(Worker(r.name, r.running_state or "Unknown",
                              started_at=created.timestamp() if created else None,
                              detail=f"revision {revision}; restarts "
                                     f"{sum(c.restart_count or 0 for c in containers)}"))
        return out

    def scale(self, n: int) -> list[Worker]:
        """Nothing to do here: replicas follow the worker app's KEDA rule, which reads the operator's count
        from /autoscale within its polling interval (rewriting min/max would replace every worker)."""
        return self.workers()

    def set_bounds(self, min_replicas: int, max_replicas: int) -> None:
        """Change min/max (creates a new revision: use between runs, not to follow load)."""
        from azure.mgmt.appcontainers import models as m

        t = self.target
        app = self.client.container_apps.get(t.resource_group, t.worker_app)
        scale = app.template.scale
        scale.min_replicas, scale.max_replicas = min_replicas, max_replicas
        # A PATCH's template replaces the whole template: without the volumes every replica would lose the share.
        envelope = m.ContainerApp(location=app.location, template=m.Template(
            containers=app.template.containers, volumes=app.template.volumes, scale=scale))
        self.client.container_apps.begin_update(t.resource_group, t.worker_app, envelope).result()

    def metrics(self, hours: float = 1.0) -> list[MetricPoint]:
        """Replicas, CPU and memory of the worker app, one point a minute (Azure publishes no GPU metric)."""
        from azure.monitor.querymetrics import MetricsClient

        client = MetricsClient(f"https://{self.target.region}.metrics.monitor.azure.com", self.credential,
                               **self.client_kwargs)
        results = client.query_resources(resource_ids=[self.target.worker_id],
                                         metric_namespace="Microsoft.App/containerApps", metric_names=METRICS,
                                         timespan=dt.timedelta(hours=hours), granularity=dt.timedelta(minutes=1),
                                         aggregations=["Average", "Maximum"])
        return [MetricPoint(metric.name, point.timestamp, point.average, point.maximum)
                for result in results for metric in result.metrics
                for series in metric.timeseries for point in series.data]

    def scaling_events(self, hours: float = 6.0) -> list[dict]:
        """KEDA scaling events of the worker app from ContainerAppSystemLogs."""
        if not self.target.workspace_id:
            raise BadRequest("scaling events need EMBEDDECK_LOG_WORKSPACE_ID (the Log Analytics workspace)")
        from azure.monitor.query import LogsQueryClient

        app = self.target.worker_app.replace("'", "")
        kql = ("ContainerAppSystemLogs_CL "
               f"| where ContainerAppName_s == '{app}' "
               "and Reason_s in ('KEDAScalersStarted', 'ScaledObjectCheckFailed', "
               "'KEDAScaleTargetActivated', 'KEDAScaleTargetDeactivated', 'ReplicaScaled') "
               "| project TimeGenerated, Reason_s, Log_s | order by TimeGenerated asc")
        result = LogsQueryClient(self.credential, **self.client_kwargs).query_workspace(
            self.target.workspace_id, kql, timespan=dt.timedelta(hours=hours))
        # A partial answer (LogsQueryPartialResult) has no .tables: its rows are in partial_data.
        tables = result.tables if hasattr(result, "tables") else result.partial_data
        if not tables:
            return []
        table = tables[0]
        return [dict(zip(table.columns, row)) for row in table.rows]
