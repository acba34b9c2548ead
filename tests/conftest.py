"""Shared fixtures: an isolated EmbedDeck home, a real SparkSession, a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.launcher import free_port

_HOME = Path(tempfile.mkdtemp(prefix="embeddeck-test-"))
os.environ["EMBEDDECK_HOME"] = str(_HOME)
os.environ.pop("EMBEDDECK_DB_URL", None)
os.environ.pop("EMBEDDECK_REGISTRY_URL", None)
os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession with the settings every run uses."""
    import sys

    from pyspark.sql import SparkSession

    from jobs.launcher import spark_conf, spark_env

    os.environ.update({k: v for k, v in spark_env().items() if k in (
        "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON", "PYTHONPATH", "SPARK_LOCAL_IP")})
    builder = SparkSession.builder.appName("embeddeck-tests")
    for key, value in spark_conf("local[2]").items():
        builder = builder.config(key, value)
    session = builder.config("spark.ui.enabled", "false").getOrCreate()
    assert sys.executable
    yield session
    session.stop()


@pytest.fixture(scope="session")
def reference_model():
    """all-MiniLM-L6-v2 in plain fp32, straight from sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    from jobs.encoder import model_path

    return SentenceTransformer(model_path("all-MiniLM-L6-v2"), device="cpu")


def reference_vectors(model, texts: list[str]) -> np.ndarray:
    return model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if not path:
        pytest.fail(f"PostgreSQL's {name} is not installed; run `make setup`")
    return path


@pytest.fixture(scope="session")
def pg_url():
    """A throwaway PostgreSQL server on 127.0.0.1, stopped at the end of the session."""
    data = Path(tempfile.mkdtemp(prefix="embeddeck-pg-"))
    port = free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    pwfile = data / "pw"
    pwfile.write_text("s3cret-pg\n")
    if as_user:
        shutil.chown(pwfile, "postgres")
    subprocess.run(as_user + [_pg_bin("initdb"), "-D", str(data / "db"), "-U", "embeddeck", "-A",
                              "scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run(as_user + [_pg_bin("pg_ctl"), "-D", str(data / "db"), "-l", str(data / "log"),
                              "-o", f"-h 127.0.0.1 -p {port} -k {data}", "-w", "start"],
                   check=True, capture_output=True)
    url = f"postgresql+psycopg://embeddeck:s3cret-pg@127.0.0.1:{port}/postgres"
    yield url
    subprocess.run(as_user + [_pg_bin("pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                   capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


def wait_until(predicate, timeout: float = 60.0, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout}s")


def check_table(url: str, reference_model, n: int, target: str) -> None:
    """Exactly one correct vector for each of the demo products 1..n in target."""
    import sqlalchemy as sa

    from jobs import db
    from jobs.texts import normalize_text

    engine = db.engine_for(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            f"SELECT t.source_id, t.embedding, p.description FROM {target} t JOIN products p "
            "ON p.id = t.source_id ORDER BY t.source_id")).all()
        dupes = conn.execute(sa.text(f"SELECT count(*) - count(DISTINCT source_id) FROM {target}")).scalar()
    assert dupes == 0
    assert [r.source_id for r in rows] == list(range(1, n + 1))
    sample = rows[:: max(1, n // 60)]
    expected = reference_vectors(reference_model, [normalize_text(r.description) for r in sample])
    got = np.stack([np.frombuffer(r.embedding, "<f4") for r in sample])
    assert (got * expected).sum(1).min() >= 0.9999
