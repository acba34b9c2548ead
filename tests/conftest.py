"""Shared fixtures: an isolated EmbedDeck home, a real SparkSession, a real PostgreSQL server."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests import postgres

# `make test` runs the suite in two pytest-xdist workers: each works in a folder of the suite's one home, made by
# the process that runs them (which loads this file first and hands its environment to them).
# Only in a pytest session: tests/e2e_images.py imports the helpers below outside one, and each CI run left an empty
# home of it in the temporary folder.
if os.environ.get("PYTEST_VERSION"):
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("EMBEDDECK_TEST_HOME"):
        _HOME = Path(os.environ["EMBEDDECK_TEST_HOME"]) / os.environ["PYTEST_XDIST_WORKER"]
        _HOME.mkdir(exist_ok=True)
    else:
        _HOME = Path(tempfile.mkdtemp(prefix="embeddeck-test-"))
        os.environ["EMBEDDECK_TEST_HOME"] = str(_HOME)
    os.environ["EMBEDDECK_HOME"] = str(_HOME)
os.environ.pop("EMBEDDECK_DB_URL", None)
os.environ.pop("EMBEDDECK_REGISTRY_URL", None)
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
# Tests share one registry: the cap on runs at once is tested where a server sets it, not between tests.
os.environ["EMBEDDECK_MAX_ACTIVE_RUNS"] = "8"
# Two test workers share the cores with JVMs, servers and each other: torch's OpenMP threads spun while they waited
# for each other, on CPU the other worker needed. test_encoder.py beside one busy core: 128-133 s spinning, 100-103 s
# with them sleeping. Set before anything loads torch (and its OpenMP runtime); subprocesses inherit it. Tests
# time no encoder, so how its threads wait changes no result; the product keeps OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def pytest_sessionfinish(session, exitstatus):
    """The suite's home goes when it passes (every server it started has stopped by now); a failed run keeps it
    for its logs. Under pytest -n the process that ran the workers decides, once they have all ended."""
    if hasattr(session.config, "workerinput"):
        return
    if exitstatus == 0:
        shutil.rmtree(_HOME, ignore_errors=True)
    else:
        print(f"\nthe suite's EmbedDeck home is kept for its logs: {_HOME}")


def pytest_collection_modifyitems(items):
    """Tests that use the PostgreSQL server belong to the integration tier, whatever their file."""
    for item in items:
        if "pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession with the settings every run uses."""
    import sys

    from pyspark.sql import SparkSession

    from jobs.spark.jvm import scratch_dir, spark_env
    from jobs.spark.submit import spark_conf

    os.environ.update({k: v for k, v in spark_env().items() if k in (
        "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "SPARK_LOCAL_IP")})
    builder = SparkSession.builder.appName("embeddeck-tests")
    for key, value in spark_conf("local[2]", scratch_dir(_HOME, "tests")).items():
        builder = builder.config(key, value)
    session = builder.config("spark.ui.enabled", "false").getOrCreate()
    assert sys.executable
    yield session
    session.stop()


@pytest.fixture(scope="session")
def reference_model():
    """all-MiniLM-L6-v2 in plain fp32, straight from sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    from jobs.embed.encoder import model_path

    return SentenceTransformer(model_path("all-MiniLM-L6-v2"), device="cpu")


@pytest.fixture(scope="session")
def fast_model(home) -> str:
    """A BERT sentence model of the default's kind and tokenizer, but tiny (1 layer, 32 wide, seeded random
    weights): it runs through the product's own encoder far faster than any real model on any machine, so
    tests that must act while a run is in flight prove they do not depend on how fast this CPU encodes."""
    import json

    import torch
    from safetensors.torch import save_file

    from jobs.embed.encoder import model_path

    src, dst = Path(model_path("all-MiniLM-L6-v2")), home / "fast-model"
    if (dst / "model.safetensors").is_file():
        return str(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    hidden, inter, vocab = 32, 64, 30522
    config = json.loads((src / "config.json").read_text()) | {
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 2}
    (dst / "config.json").write_text(json.dumps(config))
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text()) | {"word_embedding_dimension": hidden}
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (dst / "2_Normalize").mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(20261129)
    shapes = {"embeddings.word_embeddings.weight": (vocab, hidden),
              "embeddings.position_embeddings.weight": (512, hidden),
              "embeddings.token_type_embeddings.weight": (2, hidden)}
    layer = "encoder.layer.0."
    for name, shape in (("attention.self.query", (hidden, hidden)), ("attention.self.key", (hidden, hidden)),
                        ("attention.self.value", (hidden, hidden)), ("attention.output.dense", (hidden, hidden)),
                        ("intermediate.dense", (inter, hidden)), ("output.dense", (hidden, inter))):
        shapes[f"{layer}{name}.weight"] = shape
        shapes[f"{layer}{name}.bias"] = (shape[0],)
    weights = {k: torch.randn(shape, generator=gen) * 0.2 for k, shape in shapes.items()}
    for norm in ("embeddings.LayerNorm", f"{layer}attention.output.LayerNorm", f"{layer}output.LayerNorm"):
        weights[f"{norm}.weight"], weights[f"{norm}.bias"] = torch.ones(hidden), torch.zeros(hidden)
    save_file(weights, str(dst / "model.safetensors"))
    return str(dst)


@pytest.fixture(scope="session")
def fast_reference(fast_model):
    """The tiny model as sentence-transformers runs it: the reference for runs made with fast_model."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(fast_model, device="cpu")


@pytest.fixture
def hold_file(tmp_path, monkeypatch):
    """While this file exists, every embedding task pauses after its first commit ($EMBEDDECK_FAULT_HOLD_FILE);
    the variable is set for every process the test starts. Delete the file to let the run go on."""
    path = tmp_path / "hold"
    path.touch()
    monkeypatch.setenv("EMBEDDECK_FAULT_HOLD_FILE", str(path))
    yield path
    path.unlink(missing_ok=True)  # a failed test must not leave runs held for the tests after it


def reference_vectors(model, texts: list[str]) -> np.ndarray:
    return model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)


@pytest.fixture(scope="session")
def pg_url():
    """A throwaway PostgreSQL server on 127.0.0.1, stopped at the end of the session."""
    try:
        with postgres.server() as url:
            yield url
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}; run `make setup`")


def wait_until(predicate, timeout: float = 60.0, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what} not met within {timeout}s")


def arguments_of(process) -> list[str]:
    """A psutil process's arguments; none for one that ended after it was listed (a child that exited and is not
    reaped yet is a zombie, whose arguments cannot be read)."""
    import psutil

    try:
        return process.cmdline()
    except psutil.Error:
        return []


def run_service_jvms(home: Path) -> list:
    """The spark-submit JVMs (psutil processes) of the run service of this home."""
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if any(a.endswith("run_service.py") for a in
                                                                 p.info["cmdline"] or [])
            and f"spark.sql.warehouse.dir={home}/spark-warehouse" in p.info["cmdline"]]


def stopped_while_run_service_starts(args: list[str], env: dict, home: Path, stop: str) -> tuple[int, str]:
    """Run `python -m <args>` and send it signal `stop` as soon as the run service of home is starting; its exit
    status and its output (stdout and stderr together)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: run_service_jvms(home), timeout=120, every=0.05, what="the run service's start")
        proc.send_signal(getattr(signal, stop))
        return proc.wait(60), proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()


def files_holding(text: str, root: Path, since: float = 0.0, skip: tuple[Path, ...] = ()) -> list[Path]:
    """Files under root, in its entries changed since `since` (epoch seconds) but not under skip, whose bytes
    contain text: where a secret (or a run's database URL) was written. grep reads them in a process of its own:
    a process that opens and closes an SQLite file it holds open loses its locks on it (POSIX), and the suite's
    registry was corrupted so."""
    import subprocess

    def skipped(path: Path) -> bool:
        return any(path == s or s in path.parents for s in skip)

    entries = []
    for entry in root.iterdir() if root.is_dir() else ():
        try:
            if entry.lstat().st_mtime >= since and not skipped(entry):
                entries.append(str(entry))
        except OSError:
            continue  # removed meanwhile
    if not entries:
        return []
    out = subprocess.run(["grep", "-rlF", "--", text, *entries], capture_output=True, text=True)
    # Files that vanished meanwhile, another user's, and sockets (Spark's, which hold nothing) are no error here.
    errors = [line for line in out.stderr.splitlines() if not line.endswith((
        "No such file or directory", "Permission denied", "No such device or address"))]
    assert not errors, errors
    return [Path(line) for line in out.stdout.splitlines() if not skipped(Path(line))]


def shown(markdown: str) -> str:
    """The text Streamlit shows for Markdown that dashboard.views.literal escaped (AppTest reads the Markdown)."""
    return re.sub(r"\\(.)", r"\1", markdown)


def responds(url: str, **kwargs) -> bool:
    """Whether an HTTP GET of url answers 2xx now (a server that is not up yet answers False)."""
    import requests

    try:
        return requests.get(url, timeout=2, **kwargs).ok
    except requests.RequestException:
        return False


def check_table(url: str, reference_model, n: int, target: str, model: str = "all-MiniLM-L6-v2") -> None:
    """Each of the demo products 1..n has exactly one row in target (the target's key cannot hold two, so
    what can go wrong is a row lost, a stray row, a stale hash or another run's model), and the vectors
    match reference_model's."""
    import sqlalchemy as sa

    from jobs.core.texts import content_hash, normalize_text
    from jobs.store import db

    engine = db.engine_for(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            f"SELECT t.source_id, t.embedding, t.model, t.content_hash, p.description FROM {target} t "
            "LEFT JOIN products p ON p.id = t.source_id ORDER BY t.source_id")).all()
    assert [r.source_id for r in rows] == list(range(1, n + 1))
    assert {r.model for r in rows} == {model}
    texts = [normalize_text(r.description) for r in rows]
    assert [r.content_hash for r in rows] == [content_hash(t) for t in texts]
    sample = rows[:: max(1, n // 60)]
    expected = reference_vectors(reference_model, [normalize_text(r.description) for r in sample])
    got = np.stack([np.frombuffer(r.embedding, "<f4") for r in sample])
    assert (got * expected).sum(1).min() >= 0.9999


def embeddings_endpoint(answer, most_texts: int | None = None, refusal: int = 413):
    """A real OpenAI-compatible embeddings endpoint on 127.0.0.1 whose vectors for a request's texts are
    answer(texts); returns its base URL and server (shut it down when done). With most_texts, a request with more
    texts gets HTTP `refusal` and TEI's error body, and its size is kept in server.refused."""
    import http.server
    import json
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
            status = 200
            if most_texts is not None and len(texts) > most_texts:
                server.refused.append(len(texts))
                status, body = refusal, json.dumps({"error": f"batch size {len(texts)} > maximum allowed batch size "
                                                             f"{most_texts}", "error_type": "Validation"}).encode()
            else:
                body = json.dumps({"data": [{"index": i, "embedding": v}
                                            for i, v in enumerate(answer(texts))]}).encode()
            answer_json(self, status, body)

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.refused = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1", server


def answer_json(handler, status: int, body: bytes) -> None:
    """Send a JSON body from an http.server request handler."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
