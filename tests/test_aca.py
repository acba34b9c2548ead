"""The ACA backend drives the real Azure SDK clients over a stubbed azure-core transport.

We assert the exact requests our code sends and that responses in the shapes of the REST API
reference parse into our types. Nothing here ran against Azure.
"""

import datetime as dt
import json
from urllib.parse import parse_qs, urlparse

import pytest

from cluster.aca import AcaBackend, AcaTarget
from jobs.core.errors import BadRequest
from jobs.store import worker_readings
from tests.azure_stub import APP_PATH, REPLICA_A, REPLICA_B, RG, SUB, FakeCredential, StubTransport, routes


@pytest.fixture
def stub():
    return StubTransport(routes())


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


def test_per_replica_cpu_and_memory_come_split_by_replica(stub):
    usage = backend(stub).replica_usage(minutes=10)
    q = parse_qs(urlparse(stub.requests[-1].url).query)
    assert q["metricnames"] == ["UsageNanoCores,WorkingSetBytes"] and q["aggregation"] == ["Average"]
    assert q["filter"] == ["replicaName eq '*'"]  # the batch API's dimension split: one series per replica
    assert usage == {REPLICA_A: (3.5, 6 * 2**30), REPLICA_B: (0.25, 2**30)}  # the latest point of each


def test_utilisation_joins_azure_monitor_with_the_replicas_gpu_readings(stub, tmp_path, monkeypatch):
    """Azure publishes CPU and memory per replica but no GPU metric: the GPU comes from the replica's own
    NVML reading on the share, and a replica that has not reported yet still shows Azure's numbers."""
    monkeypatch.setenv("EMBEDDECK_TELEMETRY_DIR", str(tmp_path))
    gpu = worker_readings.GpuReading(0, "NVIDIA T4", 87.0, 9800.0, 15360.0, 61.0, 64.5)
    worker_readings.publish(worker_readings.Reading(REPLICA_A, "10.0.0.7", dt.datetime.now().timestamp(),
                                                    gpus=[gpu], cpu_pct=1.0, memory_mb=1.0), tmp_path)
    readings = {r.worker: r for r in backend(stub).utilisation()}
    a, b = readings[REPLICA_A], readings[REPLICA_B]
    assert a.gpus == [gpu] and a.cpu_pct == 350.0 and a.memory_mb == 6 * 1024
    assert a.source == "Azure Monitor (CPU, memory), worker (GPU)"
    assert not b.gpus and b.cpu_pct == 25.0 and "no GPU reading" in b.gpu_note


def test_a_replica_bills_one_gpu_at_the_configured_rate(stub, monkeypatch):
    monkeypatch.setenv("EMBEDDECK_PRICE_PER_UNIT_S", "0.0005")
    monkeypatch.setenv("EMBEDDECK_PRICE_SOURCE", "Azure retail price, swedencentral")
    pricing = backend(stub).pricing()
    assert (pricing.unit, pricing.units_per_worker, pricing.price_per_unit_s) == ("GPU", 1.0, 0.0005)
    monkeypatch.setenv("EMBEDDECK_PRICE_PER_UNIT_S", "cheap")
    with pytest.raises(BadRequest, match="EMBEDDECK_PRICE_PER_UNIT_S must be a number"):
        backend(stub).pricing()
