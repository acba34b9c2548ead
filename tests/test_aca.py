"""The ACA backend drives the real Azure SDK clients over a stubbed azure-core transport.

We assert the exact requests our code sends and that responses in the shapes of the REST API
reference parse into our types. Nothing here ran against Azure.
"""

import datetime as dt
import json
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest._requests_basic import RestRequestsTransportResponse

from cluster.aca import AcaBackend, AcaTarget
from jobs.core.errors import BadRequest

SUB, RG = "00000000-0000-0000-0000-00000000abcd", "rg-embed"
APP_PATH = f"/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.App/containerApps/embeddeck-worker"


class FakeCredential:
    def get_token(self, *scopes, **kwargs):
        return AccessToken("fake-token", int(dt.datetime.now().timestamp()) + 3600)

    def get_token_info(self, *scopes, options=None):
        from azure.core.credentials import AccessTokenInfo

        return AccessTokenInfo("fake-token", int(dt.datetime.now().timestamp()) + 3600)


class StubTransport(HttpTransport):
    """Records every request; answers from a table of (method, path suffix) → JSON body."""

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
                resp.status_code, resp._content, resp._content_consumed = 200, json.dumps(body).encode(), True
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
    {"name": "embeddeck-worker--r7-5d9c-abc", "properties": {
        "createdTime": "2026-11-28T10:00:00Z", "runningState": "Running",
        "containers": [{"name": "worker", "ready": True, "restartCount": 1, "runningState": "Running"}]}},
    {"name": "embeddeck-worker--r7-5d9c-def", "properties": {
        "createdTime": "2026-11-28T10:01:30Z", "runningState": "NotRunning",
        "containers": [{"name": "worker", "ready": False, "restartCount": 0, "runningState": "Waiting"}]}}]}
METRICS = {"values": [{
    "starttime": "2026-11-28T09:00:00Z", "endtime": "2026-11-28T10:00:00Z", "interval": "PT1M",
    "resourceid": APP_PATH, "resourceregion": "swedencentral", "namespace": "Microsoft.App/containerApps",
    "value": [{"id": f"{APP_PATH}/providers/Microsoft.Insights/metrics/Replicas", "type": "Microsoft.Insights/metrics",
               "name": {"value": "Replicas", "localizedValue": "Replica Count"}, "unit": "Count",
               "timeseries": [{"metadatavalues": [], "data": [
                   {"timeStamp": "2026-11-28T09:58:00Z", "average": 1.0, "maximum": 1.0},
                   {"timeStamp": "2026-11-28T09:59:00Z", "average": 2.0, "maximum": 2.0}]}]}]}]}
LOGS = {"tables": [{"name": "PrimaryResult",
                    "columns": [{"name": "TimeGenerated", "type": "datetime"}, {"name": "Reason_s", "type": "string"},
                                {"name": "Log_s", "type": "string"}],
                    "rows": [["2026-11-28T09:58:10Z", "KEDAScaleTargetActivated",
                              "Scaled apps/v1.Deployment from 0"]]}]}


@pytest.fixture
def stub():
    return StubTransport({("GET", APP_PATH): APP, ("GET", "/revisions/embeddeck-worker--r7/replicas"): REPLICAS,
                          ("POST", "/metrics:getBatch"): METRICS, ("POST", "/workspaces/ws-1/query"): LOGS})


def backend(stub):
    return AcaBackend(AcaTarget(SUB, RG, workspace_id="ws-1"), credential=FakeCredential(), transport=stub)


def test_workers_are_replicas_of_the_latest_ready_revision(stub):
    workers = backend(stub).workers()
    get_app, list_replicas = stub.requests
    assert get_app.method == "GET" and urlparse(get_app.url).path == APP_PATH
    assert parse_qs(urlparse(get_app.url).query)["api-version"] == ["2026-07-01"]
    assert urlparse(list_replicas.url).path == f"{APP_PATH}/revisions/embeddeck-worker--r7/replicas"
    assert get_app.headers["Authorization"] == "Bearer fake-token"
    assert [(w.name, w.state) for w in workers] == [("embeddeck-worker--r7-5d9c-abc", "Running"),
                                                    ("embeddeck-worker--r7-5d9c-def", "NotRunning")]
    assert workers[0].started_at == dt.datetime(2026, 11, 28, 10, tzinfo=dt.UTC).timestamp()
    assert "restarts 1" in workers[0].detail


def test_metrics_request_and_parse(stub):
    points = backend(stub).metrics(hours=1)
    req = stub.requests[-1]
    url = urlparse(req.url)
    assert url.netloc == "swedencentral.metrics.monitor.azure.com"
    assert url.path == f"/subscriptions/{SUB}/metrics:getBatch"
    q = parse_qs(url.query)
    assert q["metricnamespace"] == ["Microsoft.App/containerApps"]
    assert q["metricnames"] == ["Replicas,UsageNanoCores,WorkingSetBytes"]
    assert q["aggregation"] == ["Average,Maximum"] and q["interval"] == ["PT1M"]
    assert json.loads(req.body)["resourceids"] == [APP_PATH]
    assert [(p.metric, p.average) for p in points] == [("Replicas", 1.0), ("Replicas", 2.0)]


def test_scaling_events_query(stub):
    events = backend(stub).scaling_events(hours=6)
    req = stub.requests[-1]
    assert urlparse(req.url).path.endswith("/v1/workspaces/ws-1/query")
    body = json.loads(req.body)
    assert "ContainerAppSystemLogs_CL" in body["query"] and "embeddeck-worker" in body["query"]
    assert body["timespan"] == "PT21600.0S"  # how azure-monitor-query encodes 6 h
    assert events[0]["Reason_s"] == "KEDAScaleTargetActivated"


def test_missing_settings_are_named():
    with pytest.raises(BadRequest, match="needs AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP"):
        AcaTarget.from_env({})
