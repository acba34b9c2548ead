"""`make bench`: encoding and pipeline speed, each as a ratio to a baseline measured in the same run.

Prints `name = value` lines; the last line is `pipeline/raw = X.XX`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def measure(fn, texts: list[str], rounds: int) -> tuple[float, np.ndarray]:
    """Median texts/s over rounds (after one warm-up on a slice), and the vectors of the last round."""
    fn(texts[:64])
    speeds, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn(texts)
        speeds.append(len(texts) / (time.perf_counter() - t0))
    return float(np.median(speeds)), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rows, same code (< 3 minutes)")
    args = parser.parse_args(argv)
    n_encode, n_pipeline, rounds = (512, 1000, 1) if args.quick else (2000, 5000, 3)

    home = tempfile.mkdtemp(prefix="embeddeck-bench-")
    os.environ["EMBEDDECK_HOME"] = home
    from sentence_transformers import SentenceTransformer

    from jobs import db
    from jobs.cli import wait
    from jobs.demo import products, seed_demo
    from jobs.encoder import get_encoder, model_path
    from jobs.launcher import launch
    from jobs.runs import Registry
    from jobs.spec import RunSpec

    texts = [p["description"] for p in products(n_encode)]
    print(f"machine = {os.cpu_count()} cpus; texts = {len(texts)} demo descriptions; rounds = {rounds}")
    raw = SentenceTransformer(model_path("all-MiniLM-L6-v2"), device="cpu")
    raw_speed, raw_vecs = measure(lambda t: raw.encode(t, batch_size=64, normalize_embeddings=True), texts, rounds)
    enc = get_encoder("all-MiniLM-L6-v2")
    default_speed, default_vecs = measure(lambda t: enc.encode(t, batch_size=32), texts, rounds)
    cos = (raw_vecs * default_vecs).sum(1)
    print(f"raw_fp32_bs64_texts_per_s = {raw_speed:.1f}")
    print(f"default_texts_per_s = {default_speed:.1f}  # {enc.precision.device} {enc.precision.dtype}: "
          f"{enc.precision.reason}")
    print(f"default/fp32 = {default_speed / raw_speed:.2f}")
    print(f"min_cosine = {cos.min():.5f}")

    url = f"sqlite:///{home}/bench.sqlite"
    seed_demo(url, n=n_pipeline)
    registry = Registry()
    spec = RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                   target="bench_emb", master=f"local[{os.cpu_count()}]", launched_by="bench")
    t0 = time.perf_counter()
    run = wait(registry, launch(spec, registry), out=open(os.devnull, "w"))
    wall = time.perf_counter() - t0
    if run.state != "succeeded":
        print(f"pipeline failed: {run.error}")
        return 1
    embed_s = (run.ended_at - run.started_at).total_seconds()
    pipe_speed = run.rows_done / embed_s
    print(f"pipeline_rows = {run.rows_done}")
    print(f"pipeline_wall_s = {wall:.1f}  # launch to succeeded: JVM, Spark app, planning, model load, embedding")
    print(f"pipeline_rows_per_s = {pipe_speed:.1f}  # embedding phase, SQLite -> Spark local -> SQLite")
    print(f"pipeline/raw_fp32 = {pipe_speed / raw_speed:.2f}")
    print(f"pipeline/raw = {pipe_speed / default_speed:.2f}")
    db.engine_for(url).dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
