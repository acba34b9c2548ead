"""The HTTP API's wire contracts in-process (FastAPI's TestClient): the shapes that OpenAI, LangChain,
LlamaIndex and TEI clients send, and status codes that say whose fault a failure is."""

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from jobs.core.processes import free_port
from jobs.doors.api import create_app
from jobs.store.registry import Registry
from tests.conftest import reference_vectors

TOKEN = "contract-token-7d1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a waterproof hiking boot", "espresso machine with a steam wand"]


@pytest.fixture(scope="module")
def client(home):
    with TestClient(create_app(TOKEN, Registry())) as c:
        yield c


def decode_base64(item: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")


def test_langchain_openai_embeddings_body_gets_base64_float32(client, reference_model):
    # What langchain_openai.OpenAIEmbeddings(check_embedding_ctx_length=False).embed_documents sends
    # through the openai client: texts, the model, and the client's default encoding_format.
    body = {"input": TEXTS, "model": "all-MiniLM-L6-v2", "encoding_format": "base64"}
    r = client.post("/v1/embeddings", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    got = np.stack([decode_base64(d) for d in r.json()["data"]])
    assert got.shape == (2, 384)
    assert ((got * reference_vectors(reference_model, TEXTS)).sum(1) >= 0.9999).all()


def test_llamaindex_openai_embedding_body(client, reference_model):
    # llama_index.embeddings.openai.OpenAIEmbedding: one list of texts (newlines replaced by spaces),
    # the model name, and whatever the openai client adds by default (base64).
    body = {"input": ["espresso machine with a steam wand"], "model": "all-MiniLM-L6-v2",
            "encoding_format": "base64"}
    r = client.post("/v1/embeddings", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert item["index"] == 0 and item["object"] == "embedding"
    expected = reference_vectors(reference_model, ["espresso machine with a steam wand"])[0]
    assert float(decode_base64(item) @ expected) >= 0.9999


@pytest.mark.parametrize("tokens", [[101, 7592, 102], [[101, 7592, 102], [101, 2088, 102]]])
def test_token_ids_get_a_400_that_says_to_send_text(client, tokens):
    # LangChain's default (check_embedding_ctx_length=True) sends tiktoken ids instead of text.
    r = client.post("/v1/embeddings", json={"input": tokens, "model": "all-MiniLM-L6-v2"}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "bad_request"
    assert "token ids are not accepted" in r.json()["error"]["message"]


@pytest.mark.parametrize("route,body", [("/v1/embeddings", {"input": [], "model": "all-MiniLM-L6-v2"}),
                                        ("/api/embed", {"model": "all-MiniLM-L6-v2", "input": []}),
                                        ("/embed", {"inputs": []})])
def test_an_empty_input_is_an_invalid_request_by_the_documented_code(client, route, body):
    """It answered {"code": "error"}, a code the README's table does not have."""
    r = client.post(route, json=body, headers=AUTH)
    assert r.status_code == 422 and r.json() == {"error": {"code": "invalid_request", "message": "input is empty"}}


def test_every_error_code_the_server_sends_is_one_its_schema_lists(client):
    from jobs.doors.api import HTTP_CODES, STATUS_OF_KIND

    schema = client.get("/openapi.json", headers=AUTH).json()
    listed = set(schema["components"]["schemas"]["ApiError"]["properties"]["code"]["enum"])
    assert {*STATUS_OF_KIND, *HTTP_CODES.values(), "internal", "unauthorized"} <= listed


def test_dimensions_equal_to_the_model_is_accepted_any_other_is_a_400_naming_it(client):
    ok = client.post("/v1/embeddings", json={"input": "x", "dimensions": 384}, headers=AUTH)
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 384
    bad = client.post("/v1/embeddings", json={"input": "x", "dimensions": 256}, headers=AUTH)
    assert bad.status_code == 400 and "dimensions must be 384" in bad.json()["error"]["message"]


def test_tei_embed_shape_normalize_and_token(client, reference_model):
    r = client.post("/embed", json={"inputs": TEXTS[0]}, headers=AUTH)
    assert r.status_code == 200, r.text
    (one,) = r.json()
    assert float(np.asarray(one) @ reference_vectors(reference_model, TEXTS[:1])[0]) >= 0.9999
    raw = np.asarray(client.post("/embed", json={"inputs": TEXTS, "normalize": False, "truncate": True},
                                 headers=AUTH).json())
    norms = np.linalg.norm(raw, axis=1)
    assert raw.shape == (2, 384) and (np.abs(norms - 1) > 0.01).all()  # mean-pooled, not unit length
    unit = raw / norms[:, None]
    assert ((unit * reference_vectors(reference_model, TEXTS)).sum(1) >= 0.9999).all()
    assert client.post("/embed", json={"inputs": "x"}).status_code == 401


def test_a_run_posted_while_the_database_is_down_is_503_with_retry_after(home, monkeypatch):
    down = f"postgresql+psycopg://app:Down5ecret@127.0.0.1:{free_port()}/prod"  # nothing listens there
    monkeypatch.setenv("EMBEDDECK_DB_URL", down)
    with TestClient(create_app(TOKEN, Registry())) as c:
        r = c.post("/runs", json={"source": "products", "id_column": "id", "text_column": "description",
                                  "target": "t"}, headers=AUTH)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit()
    assert r.json()["error"]["code"] == "unavailable" and "cannot connect" in r.json()["error"]["message"]
    assert "Down5ecret" not in r.text


def test_a_bad_request_is_still_a_400(tmp_path, monkeypatch):
    from jobs.store.demo import seed_demo

    url = f"sqlite:///{tmp_path / 'contract.sqlite'}"
    seed_demo(url, n=20)
    monkeypatch.setenv("EMBEDDECK_DB_URL", url)
    with TestClient(create_app(TOKEN, Registry())) as c:
        r = c.post("/runs", json={"source": "nope", "id_column": "id", "text_column": "description",
                                  "target": "t"}, headers=AUTH)
    assert r.status_code == 400 and "source table 'nope' does not exist" in r.json()["error"]["message"]


def test_the_api_runs_only_allowed_models(client, fast_model):
    r = client.post("/v1/embeddings", json={"input": "x", "model": fast_model}, headers=AUTH)
    assert r.status_code == 400 and "is not served here (allowed: all-MiniLM-L6-v2)" in r.json()["error"]["message"]


def test_autoscale_reads_a_newer_workers_reading(tmp_path, monkeypatch):
    """A reading with a field this version does not know once made /autoscale a 500: a newer worker must
    never break scaling."""
    import json
    import time

    monkeypatch.setenv("EMBEDDECK_TELEMETRY_DIR", str(tmp_path))
    (tmp_path / "worker-9.json").write_text(json.dumps(
        {"worker": "worker-9", "host": "h", "at": time.time(), "gpus": [{"index": 0, "name": "H200",
         "utilisation_pct": 90.0, "memory_used_mb": 1.0, "memory_total_mb": 2.0, "temperature_c": None,
         "power_w": None, "sm_clock_mhz": 1980}], "cpu_pct": 5.0, "nvlink_gbps": 12.5}))
    with TestClient(create_app(TOKEN, Registry(f"sqlite:///{tmp_path / 'r.sqlite'}"))) as c:
        r = c.get("/autoscale", headers=AUTH)
    assert r.status_code == 200 and r.json()["current"] == 1


def test_a_run_in_its_own_process_asks_for_no_workers(tmp_path):
    """A run on local[N] (launched while no run service was up) counted as backlog: the autoscaler started workers
    that idled beside it, and they were billed to it."""
    registry = Registry(f"sqlite:///{tmp_path / 'r.sqlite'}")
    with TestClient(create_app(TOKEN, registry)) as c:
        registry.create("{}", "test", "products", "t1", "m", "local[*]")
        assert c.get("/autoscale", headers=AUTH).json()["desired"] == 0
        registry.create("{}", "test", "products", "t2", "m", "spark://127.0.0.1:7077")
        step = c.get("/autoscale", headers=AUTH).json()
    assert step["desired"] == 2 and step["reason"].startswith("1 run not planned yet")  # the default max


def test_the_autoscale_token_reads_the_metric_and_nothing_else(tmp_path):
    """The workers' KEDA rule once held the full API token, which can launch runs: its own token opens
    GET /autoscale alone."""
    with TestClient(create_app(TOKEN, Registry(f"sqlite:///{tmp_path / 'r.sqlite'}"), "keda-read-only")) as c:
        keda = {"Authorization": "Bearer keda-read-only"}
        assert c.get("/autoscale", headers=keda).status_code == 200
        assert c.get("/runs", headers=keda).status_code == 401
        assert c.post("/runs", json={}, headers=keda).status_code == 401
        assert c.post("/v1/embeddings", json={"input": "x"}, headers=keda).status_code == 401


def test_callers_pick_neither_the_master_nor_more_workers_than_configured(client):
    """`master` in a request once made a second application that waited with 0 cores, and `?workers=64` would
    have started 64 worker JVMs: the master is the server's, and workers are capped by EMBEDDECK_MAX_WORKERS."""
    r = client.post("/runs", json={"source": "products", "id_column": "id", "text_column": "description",
                                   "target": "t", "master": "spark://localhost:7077"}, headers=AUTH)
    assert r.status_code == 422 and "master" in r.json()["error"]["message"]
    r = client.get("/", params={"workers": 64}, headers=AUTH)
    assert r.status_code in (400, 422) and r.json()["error"]["code"] in ("bad_request", "invalid_request")
    r = client.get("/", params={"workers": 5}, headers=AUTH)
    assert r.status_code == 400
    assert "workers must be between 0 and 4 (EMBEDDECK_MAX_WORKERS), not 5" in r.json()["error"]["message"]


@pytest.mark.parametrize("args,message", [
    (["scale", "40"], "workers must be between 0 and 4 (EMBEDDECK_MAX_WORKERS), not 40"),
    # `up` took any count, and started as many worker JVMs.
    (["up", "--workers", "40"], "workers must be between 0 and 4 (EMBEDDECK_MAX_WORKERS), not 40"),
    (["autoscale", "--max", "9"], "max workers must be between 0 and 4 (EMBEDDECK_MAX_WORKERS), not 9"),
    # Accepted before, and the autoscaler then ran 3 workers against the operator's maximum of 2.
    (["autoscale", "--min", "3", "--max", "2"], "min workers (3) must not be more than max workers (2)"),
])
def test_worker_counts_over_the_limit_are_refused_before_anything_starts(tmp_path, args, message):
    """Only the API's `workers` was capped: `python -m cluster scale 40` (a typo) would have started forty worker
    JVMs on one machine, and the Cluster page allowed 64. Every manual count and autoscale bound now is."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from jobs.core.processes import free_port

    env = dict(os.environ, EMBEDDECK_HOME=str(tmp_path), EMBEDDECK_MAX_WORKERS="4",
               EMBEDDECK_MASTER_PORT=str(free_port()), EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()))
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-m", "cluster", *args], env=env, capture_output=True, text=True,
                         timeout=120, cwd=repo)
    started = list((tmp_path / "cluster").glob("*.json"))
    if started:  # a regression must not leave its forty JVMs to the tests after it
        subprocess.run([sys.executable, "-m", "cluster", "down"], env=env, capture_output=True, timeout=120, cwd=repo)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not started  # no master, no worker was started


def test_settings_saved_under_a_higher_worker_limit_keep_within_a_lowered_one(tmp_path, monkeypatch):
    """A maximum of 4 saved under EMBEDDECK_MAX_WORKERS=4 outlived the limit lowered to 2: the autoscaler asked for
    4 workers, and `python -m cluster scale 1` was refused: "max workers must be between 0 and 2, not 4"."""
    from jobs.core.autoscale import ScalingSettings
    from jobs.store import scaling
    from jobs.store.registry import Registry

    monkeypatch.setenv("EMBEDDECK_MAX_WORKERS", "4")
    registry = Registry(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    scaling.save_settings(ScalingSettings(autoscale=True, min_workers=3, max_workers=4), registry)
    monkeypatch.setenv("EMBEDDECK_MAX_WORKERS", "2")
    assert scaling.desired(registry, 0).desired == 2  # at least min_workers, now within the limit
    settings = scaling.set_manual(1, registry)
    assert (settings.min_workers, settings.max_workers, settings.desired) == (2, 2, 1)
    # A minimum above the maximum, as saving allowed before it was refused, is read within it.
    with registry.engine.begin() as conn:
        conn.execute(scaling.settings_table.update().values(
            settings_json='{"autoscale": true, "min_workers": 2, "max_workers": 1}'))
    assert (scaling.load_settings(registry).min_workers, scaling.set_manual(0, registry).max_workers) == (1, 1)
