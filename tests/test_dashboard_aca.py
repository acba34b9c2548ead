"""The dashboard on the ACA backend through Streamlit's AppTest: the real pages and SDK clients, Azure's
transport stubbed (tests/azure_stub.py), state as the deployed controller's /autoscale records it."""

from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from jobs.store import scaling
from jobs.store.registry import Registry
from tests import azure_stub

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def aca(tmp_path, monkeypatch):
    for name, value in azure_stub.ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDDECK_TELEMETRY_DIR", str(tmp_path / "telemetry"))
    stub = azure_stub.install(monkeypatch.setattr)
    run_id = azure_stub.seed(tmp_path)
    st.cache_resource.clear()  # the dashboard's backend and registry are per process: make this test's own
    yield stub, run_id
    st.cache_resource.clear()


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.switch_page(f"pages/{name}.py").run()
    assert not at.exception, at.exception
    return at


def test_cluster_page_shows_replicas_usage_and_decisions_from_azure(aca):
    stub, _ = aca
    at = page("cluster")
    paths = [r.url.split("?")[0] for r in stub.requests]
    assert any(p.endswith("/containerApps/embeddeck-worker") for p in paths)
    assert any(p.endswith("/revisions/embeddeck-worker--r7/replicas") for p in paths)
    assert any("filter=replicaName" in r.url for r in stub.requests)
    # The controller's master is only reachable inside the environment: the page says so and carries on.
    assert any("Spark master is down" in w.value for w in at.warning)
    decisions = at.dataframe[0].value
    assert list(decisions["workers"]) == ["2 → 0", "0 → 2"] and "backlog" in decisions["reason"].iloc[1]
    usage = at.dataframe[1].value
    gpu = usage[usage["kind"].str.startswith("GPU 0 NVIDIA T4")].iloc[0]
    assert gpu["worker"] == azure_stub.REPLICA_A and gpu["utilisation %"] == 87.0
    assert gpu["source"] == "Azure Monitor (CPU, memory), worker (GPU)"
    cpu = usage[usage["worker"] == azure_stub.REPLICA_B].iloc[0]
    assert cpu["utilisation %"] == 25.0 and cpu["source"] == "Azure Monitor (CPU, memory)"
    assert at.number_input[2].value == 1  # "Workers": the running replicas Azure lists (one of two runs)
    assert any("Each worker bills 1 GPU(s)" in c.value for c in at.caption)


def test_manual_scale_on_aca_records_the_count_that_autoscale_serves(aca):
    """Azure's replicas follow KEDA, which reads /autoscale: the page's manual scale is that count."""
    at = page("cluster")
    at.number_input[2].set_value(3)
    next(b for b in at.button if b.label.startswith("Scale now")).click().run()
    assert not at.exception, at.exception
    registry = Registry()
    settings = scaling.load_settings(registry)
    assert not settings.autoscale and settings.desired == 3
    decision = scaling.desired(registry, current=1)
    assert decision.desired == 3 and decision.reason == "autoscale off: manual count"


def test_run_cost_on_aca_is_gpu_seconds_at_the_configured_rate(aca):
    _, run_id = aca
    at = page("runs")
    at.selectbox[0].select(run_id).run()
    cost = next(c.value for c in at.caption if c.value.startswith("Cost:"))
    # 310 s of run: 0 workers for its first 10 s, 1 for 30 s, then 2 for 270 s (as /autoscale sampled them).
    assert cost.startswith("Cost: 570.0 GPU-seconds (570.0 worker-seconds) ≈ 0.2850 USD"), cost
    assert "0.0005 USD/GPU-second, test rate" in cost
