"""Azure as our tests see it: the real SDK clients over a stubbed azure-core transport answering with bodies in
the shapes of the REST API reference (ARM Container Apps, Azure Monitor metrics, Log Analytics).

`python -m tests.azure_stub PORT HOME` serves the real dashboard on the ACA backend over this stub, with a
history the way the deployed controller's /autoscale records it: the README's screenshot comes from it.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import requests
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest._requests_basic import RestRequestsTransportResponse

SUB, RG = "00000000-0000-0000-0000-00000000abcd", "rg-embed"
APP_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.App/containerApps/embeddeck-worker"
REPLICA_A, REPLICA_B = "embeddeck-worker--r7-5d9c-abc", "embeddeck-worker--r7-5d9c-def"
ENV = {"EMBEDDECK_CLUSTER_BACKEND": "aca", "AZURE_SUBSCRIPTION_ID": SUB, "AZURE_RESOURCE_GROUP": RG,
       "AZURE_LOCATION": "swedencentral", "EMBEDDECK_PRICE_PER_UNIT_S": "0.0005", "EMBEDDECK_PRICE_CURRENCY": "USD",
       "EMBEDDECK_PRICE_SOURCE": "test rate"}


class FakeCredential:
    def __init__(self, *args, **kwargs):
        pass

    def get_token(self, *scopes, **kwargs):
        return AccessToken("fake-token", int(dt.datetime.now().timestamp()) + 3600)

    def get_token_info(self, *scopes, options=None):
        return AccessTokenInfo("fake-token", int(dt.datetime.now().timestamp()) + 3600)


class StubTransport(HttpTransport):
    """Records every request; answers from a table of (method, path suffix) → JSON body or body(request)."""

    def __init__(self, routes):
        self.routes, self.requests = routes, []

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass

    def open(self):
        pass

    def close(self):
        pass

    def send(self, request, **kwargs):
        self.requests.append(request)
        path = urlparse(request.url).path
        for (method, suffix), body in self.routes.items():
            if request.method == method and path.endswith(suffix):
                resp = requests.Response()
                content = body(request) if callable(body) else body
                resp.status_code, resp._content, resp._content_consumed = 200, json.dumps(content).encode(), True
                resp.reason = "OK"
                resp.headers["Content-Type"] = "application/json"
                resp.url, resp.encoding = request.url, "utf-8"
                return RestRequestsTransportResponse(request=request, internal_response=resp)
        raise AssertionError(f"unexpected request {request.method} {request.url}")


APP = {"id": APP_PATH, "name": "embeddeck-worker", "location": "swedencentral",
       "properties": {"latestReadyRevisionName": "embeddeck-worker--r7", "provisioningState": "Succeeded",
                      "template": {"containers": [{"name": "worker", "image": "acr.io/w:1"}],
                                   "scale": {"minReplicas": 0, "maxReplicas": 4}}}}
REPLICAS = {"value": [
    {"name": REPLICA_A, "properties": {
        "createdTime": "2026-11-28T10:00:00Z", "runningState": "Running",
        "containers": [{"name": "worker", "ready": True, "restartCount": 1, "runningState": "Running"}]}},
    {"name": REPLICA_B, "properties": {
        "createdTime": "2026-11-28T10:01:30Z", "runningState": "NotRunning",
        "containers": [{"name": "worker", "ready": False, "restartCount": 0, "runningState": "Waiting"}]}}]}


def _metric(name: str, unit: str, series: list[dict]) -> dict:
    return {"id": f"{APP_PATH}/providers/Microsoft.Insights/metrics/{name}", "type": "Microsoft.Insights/metrics",
            "name": {"value": name, "localizedValue": name}, "unit": unit, "timeseries": series}


def _batch(metrics: list[dict]) -> dict:
    return {"values": [{"starttime": "2026-11-28T09:00:00Z", "endtime": "2026-11-28T10:00:00Z", "interval": "PT1M",
                        "resourceid": APP_PATH, "resourceregion": "swedencentral",
                        "namespace": "Microsoft.App/containerApps", "value": metrics}]}


METRICS = _batch([_metric("Replicas", "Count", [{"metadatavalues": [], "data": [
    {"timeStamp": "2026-11-28T09:58:00Z", "average": 1.0, "maximum": 1.0},
    {"timeStamp": "2026-11-28T09:59:00Z", "average": 2.0, "maximum": 2.0}]}])])


def _per_replica(values: dict[str, float]) -> list[dict]:
    return [{"metadatavalues": [{"name": {"value": "replicaname", "localizedValue": "replicaname"}, "value": r}],
             "data": [{"timeStamp": "2026-11-28T09:58:00Z", "average": v / 2},
                      {"timeStamp": "2026-11-28T09:59:00Z", "average": v}]} for r, v in values.items()]


REPLICA_METRICS = _batch([
    _metric("UsageNanoCores", "NanoCores", _per_replica({REPLICA_A: 3.5e9, REPLICA_B: 0.25e9})),
    _metric("WorkingSetBytes", "Bytes", _per_replica({REPLICA_A: 6 * 2**30, REPLICA_B: 1 * 2**30}))])
LOGS = {"tables": [{"name": "PrimaryResult",
                    "columns": [{"name": "TimeGenerated", "type": "datetime"}, {"name": "Reason_s", "type": "string"},
                                {"name": "Log_s", "type": "string"}],
                    "rows": [["2026-11-28T09:58:10Z", "KEDAScaleTargetActivated",
                              "Scaled apps/v1.Deployment from 0"]]}]}


def metrics_batch(request) -> dict:
    """Azure Monitor answers the metrics asked for: the app's, or the per-replica split."""
    names = parse_qs(urlparse(request.url).query)["metricnames"][0]
    return REPLICA_METRICS if names == "UsageNanoCores,WorkingSetBytes" else METRICS


def routes() -> dict:
    return {("GET", APP_PATH): APP, ("GET", "/revisions/embeddeck-worker--r7/replicas"): REPLICAS,
            ("POST", "/metrics:getBatch"): metrics_batch, ("POST", "/workspaces/ws-1/query"): LOGS}


def install(setattr_) -> StubTransport:
    """Route every azure-core request of this process to a stub and sign in with a fake credential;
    setattr_ is pytest's monkeypatch.setattr or plain setattr."""
    import azure.identity
    from azure.core.pipeline.transport import RequestsTransport

    stub = StubTransport(routes())
    setattr_(RequestsTransport, "send", lambda self, request, **kw: stub.send(request, **kw))
    setattr_(azure.identity, "DefaultAzureCredential", FakeCredential)
    return stub


def seed(home: Path) -> str:
    """What the deployed system would hold: a GPU reading from one replica (its NVML sidecar), the worker
    counts and decisions /autoscale recorded while a run took the workers 0 -> 2 -> 0, and that run."""
    from jobs.core.settings import Settings
    from jobs.store import scaling, worker_readings
    from jobs.store.db import utcnow
    from jobs.store.registry import Registry

    worker_readings.publish(worker_readings.Reading(
        REPLICA_A, "10.0.0.7", dt.datetime.now().timestamp(), gpus=[worker_readings.GpuReading(
            0, "NVIDIA T4", 87.0, 9800.0, 15360.0, 61.0, 64.5)], cpu_pct=340.0, memory_mb=5900.0, processes=4),
        worker_readings.store_dir(home))
    registry = Registry(Settings().raw("EMBEDDECK_REGISTRY_URL") or f"sqlite:///{home / 'registry.sqlite'}")
    scaling.ScaleHistory(registry)  # makes the history's tables, as the controller's first poll does
    now = utcnow()
    at = [now - dt.timedelta(seconds=s) for s in (600, 420, 400, 90, 60)]
    with registry.engine.begin() as conn:
        conn.execute(scaling.samples_table.insert(), [
            {"at": at[0] + dt.timedelta(seconds=30 * i), "workers": n, "desired": d}
            for i, (n, d) in enumerate([(0, 0)] * 6 + [(0, 2), (1, 2), (2, 2)] + [(2, 2)] * 8 + [(2, 0), (0, 0)])])
        conn.execute(scaling.events_table.insert(), [
            {"at": at[1], "from_workers": 0, "to_workers": 2, "reason": "backlog: 20,000 rows pending, 1 queued run",
             "source": "autoscaler"},
            {"at": at[3], "from_workers": 2, "to_workers": 0, "reason": "idle for 300s", "source": "autoscaler"}])
    run_id = registry.create("{}", "api", "products", "product_embeddings", "all-MiniLM-L6-v2", "spark://controller")
    registry.start(run_id, 20000, 0)
    registry.progress(run_id, 20000, 95.0)
    registry.finish(run_id, "succeeded")
    registry._update(run_id, only_active=False, started_at=at[2], ended_at=at[3])
    return run_id


def serve(port: int, home: Path) -> None:
    """The real dashboard server (dashboard.server, as the product starts it) on the ACA backend, Azure stubbed in
    this process."""
    from dashboard import server

    install(setattr)
    seed(home)
    server.main(["--server.address", "127.0.0.1", "--server.port", str(port)])


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]))
