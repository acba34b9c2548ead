"""`make bench`: speed figures, each beside a baseline measured in the same run.

Prints `name = value` lines; the last line is `pipeline/raw = X.XX`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from jobs.core.processes import exit_with
from jobs.core.settings import Settings
from jobs.core.spec import DEFAULT_BATCH_SIZE


def laps():
    """A function that prints, to stderr, the seconds since its last call under a label: where the bench's minutes
    go (QUICK must stay under three)."""
    last = [time.perf_counter()]

    def lap(label: str) -> None:
        now = time.perf_counter()
        print(f"# {label}: {now - last[0]:.1f} s", file=sys.stderr, flush=True)
        last[0] = now
    return lap


def measure(fn, texts: list[str], rounds: int) -> tuple[float, np.ndarray]:
    """Median texts/s over rounds (after a warm-up on a slice), and the vectors of the last round."""
    fn(texts[:64])
    speeds, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn(texts)
        speeds.append(len(texts) / (time.perf_counter() - t0))
    return float(np.median(speeds)), out


def gemm_gflops(enc, rows: int, windows: int = 9, seconds: float = 0.4) -> float:
    """GFLOP/s of this machine's matrix products at the encoder's layer shapes and precision, with operands
    already in that precision (median of short windows: the machine is noisy): the rate an encoder made only
    of its linear layers would reach. The best of torch's plain product and oneDNN's on packed weights."""
    import torch
    import torch.nn.functional as F

    from jobs.embed import bert

    h, ff = enc.model.dim, enc.model.intermediate
    device = enc.precision.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(enc.precision.dtype, torch.float32)
    shapes = [(3 * h, h), (h, h), (ff, h), (h, ff)]  # query-key-value, attention out, up, down
    weights = [torch.randn(out, inp, device=device, dtype=dtype) for out, inp in shapes]
    inputs = [torch.randn(rows, inp, device=device, dtype=dtype) for _, inp in shapes]
    flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    products = {"plain": lambda: [F.linear(x, w) for x, w in zip(inputs, weights)]}
    packable = {torch.bfloat16: bert.bf16_packing_supported, torch.float32: torch.backends.mkldnn.is_available}
    if device == "cpu" and packable.get(dtype, lambda: False)():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
        products["packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                      for x, p in zip(inputs, packed)]
    best = 0.0
    with torch.inference_mode():
        for product in products.values():
            product()
            sync()
            rates = []
            for _ in range(windows):
                done, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    product()
                    done += 1
                sync()
                rates.append(flops * done / (time.perf_counter() - t0) / 1e9)
            best = max(best, float(np.median(rates)))
    return best


def batch_rows(enc, texts: list[str]) -> int:
    """The mean padded tokens of the encoder's batches over these texts: the row count of its products."""
    return round(np.mean([ids.size for _, ids, _ in enc.model.batches(texts, DEFAULT_BATCH_SIZE)]))


def paired_ceiling(enc, texts: list[str], rounds: int) -> tuple[float, float, float]:
    """Texts/s of the encoder and the GEMM ceiling at its batches' mean padded tokens, each round timing one
    after the other so that both see the same moment of a noisy machine: medians of texts/s, of GFLOP/s and
    of the per-round ratio."""
    flops_per_text = enc.model.flops(texts) / len(texts)
    rows = batch_rows(enc, texts)
    speeds, gemms = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        enc.encode(texts)
        speeds.append(len(texts) / (time.perf_counter() - t0))
        gemms.append(gemm_gflops(enc, rows, windows=3))
    ratios = [s * flops_per_text / 1e9 / g for s, g in zip(speeds, gemms)]
    return float(np.median(speeds)), float(np.median(gemms)), float(np.median(ratios))


LINEAR = "linear layers"
SHARE_OF = {LINEAR: ("addmm", "aten::mm", "aten::linear", "linear_pointwise"),
            "attention": ("bmm", "matmul", "scaled_dot_product", "flash_attention", "softmax"),
            "layer norms": ("layer_norm",), "GELU": ("gelu",),
            "casts and copies": ("_to_copy", "aten::copy_", "aten::to", "clone"), "adds": ("aten::add",),
            "embeddings": ("embedding", "index_select")}


def time_shares(enc, texts: list[str]) -> tuple[str, float]:
    """Where the encoder's time goes, from torch's profiler (self time per operator, grouped), with the
    tokenizer's share of the whole encode call; and the seconds the linear layers took."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    enc.model.token_ids(texts)
    tokenize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        enc.encode(texts)
    encode_s = time.perf_counter() - t0
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        group = next((g for g, keys in SHARE_OF.items() if any(k in event.key for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    parts = ", ".join(f"{g} {100 * v / whole:.0f}%" for g, v in sorted(totals.items(), key=lambda kv: -kv[1]))
    line = f"{parts} of operator time; tokenizing {100 * tokenize_s / encode_s:.0f}% of an encode call"
    return line, totals.get(LINEAR, 0.0) / 1e6


def paired_linear(enc, texts: list[str], rounds: int) -> tuple[str, float]:
    """The last profiled pass's time shares, and the median over rounds of the linear layers' GFLOP/s against
    the GEMM ceiling measured right after each pass (one unpaired pass read 0.84-1.00 on this noisy machine)."""
    linear_flops, rows = enc.model.flops(texts, attention=False), batch_rows(enc, texts)
    ratios, line = [], ""
    for _ in range(rounds):
        line, linear_s = time_shares(enc, texts)
        ratios.append(linear_flops / linear_s / 1e9 / gemm_gflops(enc, rows, windows=3))
    return line, float(np.median(ratios))


def other_engines(enc, texts: list[str], rounds: int) -> dict[str, tuple[float, float, float]]:
    """The same model on the same tokens and batches in two other CPU inference engines, each round timed
    right after ours: OpenVINO (its own fused attention and norm kernels, at our precision) and ONNX Runtime
    (fp32: it has no bf16 products on x86). Per engine: median texts/s, median ratio to ours, min cosine."""
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as transformers_logging

    from jobs.embed.encoder import model_path

    transformers_logging.set_verbosity_error()  # its tracer reads the training loss, which this model lacks

    # OpenVINO's converter reports usage to Intel when its telemetry package imports; without it, a stub.
    sys.modules.setdefault("openvino_telemetry", None)
    import onnxruntime
    import openvino

    class Pooled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1)

    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = AutoModel.from_pretrained(model_path(enc.model_name), attn_implementation="eager")
    pooled = Pooled(model.eval())
    example = torch.ones(2, 8, dtype=torch.int64)
    dynamic = {0: "batch", 1: "tokens"}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    with torch.no_grad(), warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")  # the tracers' notes on Python values in the model's code
        ov_model = openvino.convert_model(pooled, example_input={"input_ids": example, "attention_mask": example})
        torch.onnx.export(pooled, (example, example), f"{tmp}/model.onnx", input_names=["input_ids", "attention_mask"],
                          dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic}, dynamo=False)
        ort_session = onnxruntime.InferenceSession(f"{tmp}/model.onnx", options, providers=["CPUExecutionProvider"])
    ov_request = openvino.Core().compile_model(ov_model, "CPU", {
        "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if enc.precision.dtype == "bf16" else "f32"}).create_infer_request()
    runs = {f"openvino_{enc.precision.dtype}": lambda ids, mask: next(iter(ov_request.infer(
                {"input_ids": ids, "attention_mask": mask}).values())),
            "onnxruntime_fp32": lambda ids, mask: ort_session.run(None, {"input_ids": ids,
                                                                          "attention_mask": mask})[0]}

    def encode_with(run, batch_texts: list[str]) -> np.ndarray:
        out = np.empty((len(batch_texts), enc.dim), dtype=np.float32)
        for rows, ids, lengths in enc.model.batches(batch_texts, DEFAULT_BATCH_SIZE):
            out[rows] = run(ids, (np.arange(ids.shape[1]) < np.array(lengths)[:, None]).astype(np.int64))
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    results = {}
    for name, run in runs.items():
        speeds, ratios = [], []
        for _ in range(rounds):  # measure() warms each up on a slice first
            mine, ours = measure(enc.encode, texts, 1)
            theirs, vecs = measure(lambda t, run=run: encode_with(run, t), texts, 1)
            speeds.append(theirs)
            ratios.append(theirs / mine)
        results[name] = (float(np.median(speeds)), float(np.median(ratios)), float((vecs * ours).sum(1).min()))
    return results


def encoder_child(n: int, part: int = 0, parts: int = 1) -> None:
    """One process, one torch thread (as a Spark task runs) on the first n demo texts, or (parts > 1) on its share
    of the key ranges a run over them plans on parts cores, each range encoded apart as a task does. Says "ready"
    once its model is loaded, then answers each line on stdin: "rate" with its texts/s and texts encoded,
    "ceiling" with its default/gemm_ceiling on its one core (paired rounds)."""
    import torch

    from jobs.core import plan
    from jobs.embed.encoder import get_encoder
    from jobs.store.demo import products

    torch.set_num_threads(1)
    texts = [p["description"] for p in products(n) if p["description"] is not None]
    windows = [texts]
    if parts > 1:
        ends = plan.split_ends(len(texts), plan.default_partitions(parts, len(texts)))
        windows = [texts[a + 1:b + 1] for a, b in zip([-1] + ends, ends)][part::parts]
    enc = get_encoder("all-MiniLM-L6-v2")
    enc.encode(texts[:32])
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "ceiling":
            print(paired_ceiling(enc, texts, 2)[2], flush=True)
            continue
        t0 = time.perf_counter()
        for window in windows:
            enc.encode(window)
        done = sum(map(len, windows))
        print(done / (time.perf_counter() - t0), done, flush=True)


class EncoderProcesses:
    """Single-threaded encoder processes on the first n demo texts (each on all of them, or with split on its
    share of a run's key ranges, as one task per core takes them), loaded once and then timed on demand, those
    asked together starting together. Loading takes 3-4 s a process: the bench loaded seven, now four."""

    def __init__(self, n: int, count: int, split: bool = False):
        self.procs = [subprocess.Popen([sys.executable, "-c", "from jobs.doors.bench import encoder_child; "
                                        f"encoder_child({n}, {i if split else 0}, {count if split else 1})"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                      for i in range(count)]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                self.close()
                raise RuntimeError(f"encoder process exited with {p.poll()} before it was ready")

    def ask(self, command: str, which: Iterable[int] | None = None) -> list[list[float]]:
        """Send command ("rate" or "ceiling") to these processes (all by default) at once; their answers."""
        chosen = [self.procs[i] for i in (range(len(self.procs)) if which is None else which)]
        for p in chosen:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        answers = []
        for p in chosen:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"encoder process exited with {p.wait()} during {command!r}")
            answers.append([float(x) for x in line.split()])
        return answers

    def close(self) -> None:
        """End of input: each process exits."""
        for p in self.procs:
            p.stdin.close()
        for p in self.procs:
            p.wait(30)

    def __enter__(self) -> EncoderProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parallel_rates(n: int) -> tuple[float, float, float]:
    """Texts/s of one single-threaded encoder process alone, and of two side by side (summed): what two
    one-core workers can get from this machine's cores at best; and the lone process's default/gemm_ceiling
    on its one core."""
    with EncoderProcesses(n, 2) as procs:
        (one, _), = procs.ask("rate", [0])
        (ratio,), = procs.ask("ceiling", [0])
        return one, sum(rate for rate, _ in procs.ask("rate")), ratio


def split_rate(procs: EncoderProcesses) -> float:
    """Texts/s of split encoder processes, one per core, each encoding its share of a run's key ranges one range at
    a time: all the texts over the slowest one's time. What the pipeline's tasks would reach with nothing of Spark
    around them, on the same texts in the same windows."""
    done = procs.ask("rate")
    return sum(count for _, count in done) / max(count / rate for rate, count in done)


def service_executors(tries: int = 5) -> int:
    """Active executors of the run service, as its Spark UI lists them; -1 where the UI did not answer any of
    tries asks (right after a run it once missed a 2 s timeout, and the bench took the -1 for a count)."""
    import requests

    from jobs.spark import run_service

    ui = (run_service.info() or {}).get("ui_url")
    for _ in range(tries):
        try:
            app = requests.get(f"{ui}/api/v1/applications", timeout=2).json()[0]["id"]
            listed = requests.get(f"{ui}/api/v1/applications/{app}/executors", timeout=2).json()
        except (requests.RequestException, ValueError, IndexError, KeyError):
            time.sleep(0.5)
            continue
        return sum(1 for e in listed if e["id"] != "driver" and e.get("isActive"))
    return -1


def timed_run(spec, registry):
    """Launch, follow to the end; returns the run, wall seconds, and seconds to the first committed vector."""
    import sqlalchemy as sa

    from jobs import lifecycle
    from jobs.store import db

    start = db.utcnow()
    t0 = time.perf_counter()
    run = lifecycle.wait(lifecycle.launch(spec, registry), registry)
    wall = time.perf_counter() - t0
    engine = db.engine_for(spec.db_url)
    with engine.connect() as conn:
        first = conn.execute(sa.text(f'SELECT min(embedded_at) FROM "{spec.target}" WHERE embedded_at >= :s'),
                             {"s": start}).scalar()
    if isinstance(first, str):
        first = dt.datetime.fromisoformat(first)
    return run, wall, (first - start).total_seconds() if first else float("nan")


def cluster_cli(*args: str) -> None:
    """`python -m cluster ARGS` in this environment; raises when it fails."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "cluster", *args], check=True, stdout=subprocess.DEVNULL)


def stages_line(run) -> str:
    """The run's start-up breakdown as `jvm 3.1 + spark_app 6.9 + ...` seconds."""
    import json

    from jobs.core.progress import start_breakdown

    stages = start_breakdown(json.loads(run.timings or "{}"))
    return " + ".join(f"{name} {seconds:.1f}" for name, seconds in stages.items())


def python_worker(cmdline: str, ppid: int) -> bool:
    """Whether a process is a Spark Python worker: forked from our daemon, unlike the daemon itself."""
    import psutil

    return "jobs.spark.daemon" in cmdline and "jobs.spark.daemon" in " ".join(psutil.Process(ppid).cmdline())


def peak_rss_mb(spec, registry) -> tuple[float, float]:
    """Run spec; peak RSS of any one Spark Python worker (not the daemon), and of the run service's driver."""
    import threading

    import psutil

    worker, driver, done = [0.0], [0.0], threading.Event()

    def sample():
        while not done.is_set():
            for p in psutil.process_iter(["cmdline", "ppid"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if "jobs/spark/run_service.py" in cmd and "python" in p.name():
                        driver[0] = max(driver[0], p.memory_info().rss / 2**20)
                    if python_worker(cmd, p.info["ppid"]):
                        worker[0] = max(worker[0], p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run, _, _ = timed_run(spec, registry)
    done.set()
    thread.join()
    if run.state != "succeeded":
        raise RuntimeError(f"memory run failed: {run.error}")
    return worker[0], driver[0]


CPU_ROLES = ("Python workers", "executor JVMs", "driver", "master and worker JVMs")


def cpu_by_role() -> dict[str, float]:
    """CPU seconds used so far by the live processes of each role in a standing cluster, and the machine's
    busy seconds (`machine`): snapshots taken around a run say where its CPU went. Processes of no role are
    left out; the rest of the machine's time is theirs (the bench itself, the kernel, exited processes)."""
    import psutil

    used = dict.fromkeys(CPU_ROLES, 0.0)
    for p in psutil.process_iter(["cmdline", "ppid", "cpu_times"]):
        try:
            cmd, times = " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
            if times is None:  # not ours to read
                continue
            if python_worker(cmd, p.info["ppid"]):
                role = "Python workers"
            elif "CoarseGrainedExecutorBackend" in cmd:
                role = "executor JVMs"
            elif "SparkSubmit" in cmd or "jobs/spark/run_service.py" in cmd:
                role = "driver"
            elif "deploy.master.Master" in cmd or "deploy.worker.Worker" in cmd:
                role = "master and worker JVMs"
            else:
                continue
            used[role] += times.user + times.system
        except psutil.Error:
            pass
    machine = psutil.cpu_times()  # guest time is already in user; steal is the host's
    used["machine"] = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
    return used


def cpu_line(used: dict[str, float]) -> str:
    """Where the CPU of some runs went, as shares of the machine's busy seconds, and how busy its cores were
    over their `wall` seconds."""
    shares = ", ".join(f"{role} {100 * used[role] / used['machine']:.0f} %" for role in CPU_ROLES)
    rest = 100 * (used["machine"] - sum(used[role] for role in CPU_ROLES)) / used["machine"]
    busy = 100 * used["machine"] / (used["wall"] * (os.cpu_count() or 1))
    return f"{shares}, the rest (the bench itself, the kernel) {rest:.0f} %; the cpus {busy:.0f} % busy"


def write_search_table(url: str, n: int, centers: np.ndarray) -> None:
    """n stored 384-d vectors generated around real embeddings (centers) with noise: the structure of an
    embedded catalogue without encoding a million texts."""
    import sqlalchemy as sa

    from jobs.store import db

    engine = db.engine_for(url)
    target = db.target_table("search_emb", sa.Integer(), sa.LargeBinary())
    target.metadata.create_all(engine)
    rng = np.random.default_rng(0)
    now = db.utcnow()
    for start in range(0, n, 20_000):
        m = min(20_000, n - start)
        vecs = centers[rng.integers(0, len(centers), m)] + 0.6 * rng.standard_normal((m, 384)) / np.sqrt(384)
        with engine.begin() as conn:
            db.upsert(conn, target, [dict(source_id=start + i, embedding=v.astype("<f4").tobytes(), model="m",
                                          content_hash="h", embedded_at=now) for i, v in enumerate(vecs)])


def own_peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program (VmHWM). Not getrusage's ru_maxrss:
    Linux carries that across exec from the process that spawned this one, so it read the bench's own peak."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def search_child(url: str, queries_file: str) -> None:
    """In a process of its own (its peak RSS is the figure): load the model as a searching process does, build
    the product's index from the table, time top-10 for each query, and measure recall@10 against an exact
    pass over the same table."""
    from jobs.embed import search
    from jobs.embed.encoder import get_encoder
    from jobs.store import db

    get_encoder("all-MiniLM-L6-v2").encode(["waterproof hiking boots"])  # a searching process holds its model
    qs = np.load(queries_file)
    engine = db.engine_for(url)
    target = db.reflect(engine, "search_emb")
    index = search.VectorIndex(engine, target, 384)
    t0 = time.perf_counter()
    index.refresh()
    build_s = time.perf_counter() - t0
    lat, got = [], []
    for q in qs:
        t0 = time.perf_counter()
        got.append(index.top_k(q, 10)[1])
        lat.append((time.perf_counter() - t0) * 1000)
    # Exact answers: one streaming pass over the table for all queries at once.
    unit = qs / np.linalg.norm(qs, axis=1, keepdims=True)
    best_s = np.full((len(qs), 10), -np.inf, np.float32)
    best_i = np.zeros((len(qs), 10), np.int64)
    for ids, mat, _ in index.chunks(None):
        scores = np.concatenate([best_s, unit @ mat.T], axis=1)
        idx = np.concatenate([best_i, np.broadcast_to(ids, (len(qs), len(ids)))], axis=1)
        order = np.argsort(-scores, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(scores, order, 1), np.take_along_axis(idx, order, 1)
    recall = np.mean([len(set(g.tolist()) & set(e.tolist())) / 10 for g, e in zip(got, best_i)])
    scan = []
    for q in unit[:2]:
        t0 = time.perf_counter()
        search.scan_top_k(engine, target, q, 10)
        scan.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                      "recall": float(recall), "build_s": build_s, "index_mb": index.nbytes / 2**20,
                      "kind": "faiss IVF-SQ8" if index.ann is not None else "exact",
                      "scan_p50": float(np.median(scan)),
                      "peak_rss_mb": own_peak_rss_mb()}))


def bench_search(home: str, n: int, queries: int, centers: np.ndarray) -> dict[str, float]:
    """Search over n stored vectors in a process of its own (index build, p50/p99, recall@10, peak RSS)."""
    url = f"sqlite:///{home}/search.sqlite"
    t0 = time.perf_counter()
    write_search_table(url, n, centers)
    write_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    qs = (centers[rng.integers(0, len(centers), queries)]
          + 0.6 * rng.standard_normal((queries, 384)) / np.sqrt(384)).astype(np.float32)
    qfile = f"{home}/queries.npy"
    np.save(qfile, qs)
    out = subprocess.run([sys.executable, "-c", f"from jobs.doors.bench import search_child; "
                                                f"search_child({url!r}, {qfile!r})"],
                         capture_output=True, text=True, check=True)
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "write_s": write_s}


FLOOR_PAGE = """import streamlit as st

st.write("Workers over time")
"""


def dashboard_watch_cpu_pct(seconds: float, home: str) -> dict[str, float]:
    """Percent of one core a Streamlit server uses while one headless Chromium sits on a page: the product's
    Cluster page as its .streamlit/config.toml serves it (live view, no run active); the same with Streamlit's
    default file watcher; and Streamlit's own floor, a one-line page with the product's config. The servers start
    together and are watched one at a time (the others have no session)."""
    import psutil
    import requests
    from playwright.sync_api import sync_playwright

    from jobs.core.processes import free_port
    from jobs.core.settings import REPO

    floor = Path(home) / "floor-page"
    (floor / ".streamlit").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / ".streamlit" / "config.toml", floor / ".streamlit" / "config.toml")
    (floor / "app.py").write_text(FLOOR_PAGE)
    product_server, plain_server = ["dashboard.server"], ["streamlit", "run", "app.py"]  # the floor's is no product
    pages = {"product": (REPO, "cluster", product_server, {}),
             "file_watcher": (REPO, "cluster", product_server, {"STREAMLIT_SERVER_FILE_WATCHER_TYPE": "auto"}),
             "floor": (floor, "", plain_server, {})}
    servers = {}
    for name, (cwd, _, command, extra) in pages.items():
        port = free_port()
        servers[name] = port, subprocess.Popen(
            [sys.executable, "-m", *command, "--server.address", "127.0.0.1", "--server.port", str(port)], cwd=cwd,
            env=dict(os.environ, PYTHONPATH=str(REPO), **extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        for port, _ in servers.values():
            while time.monotonic() < deadline:
                try:
                    if requests.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).ok:
                        break
                except requests.RequestException:
                    time.sleep(0.3)
        used = {}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            for name, (port, server) in servers.items():
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{port}/{pages[name][1]}")
                page.get_by_text("Workers over time").first.wait_for(timeout=60_000)
                proc = psutil.Process(server.pid)
                before, t0 = proc.cpu_times(), time.monotonic()
                time.sleep(seconds)
                after = proc.cpu_times()
                used[name] = 100 * ((after.user + after.system) - (before.user + before.system)) / (
                    time.monotonic() - t0)
                page.close()
            browser.close()
        return used
    finally:
        for _, server in servers.values():
            server.terminate()
        for _, server in servers.values():
            server.wait(10)


def main(argv: list[str] | None = None) -> int:
    """`make bench`: every figure, in a home of its own that goes when the bench ends, passed or failed (its
    databases, a million vectors among them, and Spark's work took 2.2 GB a run, and 43 runs filled a disk)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rows, same code (< 3 minutes)")
    args = parser.parse_args(argv)
    home = tempfile.mkdtemp(prefix="embeddeck-bench-")
    os.environ["EMBEDDECK_HOME"] = home
    try:
        return run_all(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_all(args: argparse.Namespace, home: str) -> int:
    """The figures in order, pipeline/raw last."""
    lap = laps()
    n_encode, n_pipeline, rounds, n_search, n_scale = ((512, 1000, 1, 120_000, 400) if args.quick
                                                        else (2000, 5000, 3, 1_000_000, 3000))
    from sentence_transformers import SentenceTransformer

    from jobs.core.processes import free_port
    from jobs.core.spec import RunSpec
    from jobs.embed.bert import BertSentenceEncoder
    from jobs.embed.encoder import get_encoder, model_path
    from jobs.spark import run_service
    from jobs.store import db, scaling
    from jobs.store.demo import products, seed_demo
    from jobs.store.registry import Registry

    texts = [p["description"] for p in products(n_encode)]
    lap("imports")
    print(f"machine = {os.cpu_count()} cpus; texts = {len(texts)} demo descriptions; rounds = {rounds}")
    raw = SentenceTransformer(model_path("all-MiniLM-L6-v2"), device="cpu")
    raw_speed, raw_vecs = measure(lambda t: raw.encode(t, batch_size=64, normalize_embeddings=True), texts, rounds)
    enc = get_encoder("all-MiniLM-L6-v2")
    default_speed, default_vecs = measure(enc.encode, texts, rounds)
    print(f"raw_fp32_bs64_texts_per_s = {raw_speed:.1f}")
    budget = getattr(enc.model, "batch_tokens", None)
    print(f"default_texts_per_s = {default_speed:.1f}  # {enc.precision.device} {enc.precision.dtype}: "
          f"{enc.precision.reason}; batches of at most {DEFAULT_BATCH_SIZE} rows"
          + (f" and {budget} padded tokens" if budget else ""))
    print(f"default/fp32 = {default_speed / raw_speed:.2f}")
    print(f"min_cosine = {(raw_vecs * default_vecs).sum(1).min():.5f}")
    lap("raw and default")
    if isinstance(enc.model, BertSentenceEncoder):
        # The roofline: how far any implementation at this precision could go on this machine.
        flops_per_text = enc.model.flops(texts) / len(texts)
        mean_tokens = enc.count_tokens(texts) / len(texts)
        paired_rounds = 2 if args.quick else 5
        speed, gemm, ratio = paired_ceiling(enc, texts, paired_rounds)
        print(f"gemm_gflops = {gemm:.1f}  # {enc.precision.dtype} matrix products at the model's layer shapes, "
              f"operands already {enc.precision.dtype}")
        print(f"default_gflops = {speed * flops_per_text / 1e9:.1f}  # {flops_per_text / 1e9:.2f} GFLOP "
              f"per text ({mean_tokens:.0f} tokens)")
        print(f"default/gemm_ceiling = {ratio:.2f}  # median of {paired_rounds} rounds, each timing the encoder "
              f"and then the GEMMs")
        print(f"gemm_ceiling/fp32 = {gemm * 1e9 / flops_per_text / raw_speed:.2f}  # the most any "
              f"{enc.precision.dtype} encoder could reach over raw here")
        shares, linear_ratio = paired_linear(enc, texts, 1 if args.quick else 3)
        print(f"encoder_time_shares = {shares}")
        print(f"linear_layers/gemm_ceiling = {linear_ratio:.2f}  # the linear layers alone, timed by the profiler, "
              f"each pass paired with the GEMMs: what is left to gain is in the other shares")
        on_cpu = enc.precision.device == "cpu"  # the other engines run on the CPU only
        engines = other_engines(enc, texts[:128] if args.quick else texts, rounds) if on_cpu else {}
        for name, (rate, to_ours, cosine) in engines.items():
            print(f"{name}_texts_per_s = {rate:.1f}  # the same model, tokens and batches; min cosine to ours "
                  f"{cosine:.5f}")
            print(f"{name.split('_')[0]}/default = {to_ours:.2f}  # median of {rounds} rounds, each timing ours "
                  "and then it")

        lap("roofline, shares, other engines")

    one, two, task_ratio = parallel_rates(128 if args.quick else n_encode // 2)
    print(f"encode_1p_1t_texts_per_s = {one:.1f}  # one process, one torch thread (a Spark task's setting)")
    print(f"task/gemm_ceiling_1t = {task_ratio:.2f}  # that process against one core's GEMM ceiling, paired rounds")
    print(f"encode_2p_1t_texts_per_s = {two:.1f}  # two such processes side by side, summed")
    print(f"parallel_2p/1p = {two / one:.2f}  # the most two one-core workers can gain over one on this machine")
    lap("single-threaded processes")

    # A query is one short text: the first of its batch shape in a process also pays oneDNN's kernels for it.
    query_ms = []
    for p in products(21):
        t0 = time.perf_counter()
        enc.encode([p["title"]])
        query_ms.append((time.perf_counter() - t0) * 1000)
    s = bench_search(home, n_search, 200, default_vecs)
    print(f"search_vectors = {n_search}  # 384-d in embedded SQLite, generated around the {len(default_vecs)} "
          f"real embeddings above (not encoded); written in {s['write_s']:.0f} s")
    print(f"search_index = {s['kind']}, built in {s['build_s']:.1f} s, {s['index_mb']:.0f} MiB")
    tag = f"{n_search // 1_000_000}m" if n_search >= 1_000_000 else f"{n_search // 1000}k"
    print(f"search_{tag}_p50_ms = {s['p50']:.2f}  # top-10, query encoding excluded (query_encode_ms)")
    print(f"search_{tag}_p99_ms = {s['p99']:.2f}")
    print(f"search_{tag}_recall10 = {s['recall']:.3f}  # against exact search on the same 200 queries")
    print(f"search_peak_rss_mb = {s['peak_rss_mb']:.0f}  # the searching process's own: model, index, exact pass")
    print(f"search_scan_p50_ms = {s['scan_p50']:.0f}  # baseline: streaming scan per query")
    print(f"search_scan/index = {s['scan_p50'] / s['p50']:.0f}")
    print(f"query_encode_ms = {np.median(query_ms[1:]):.1f}  # one product title, median of 20 after the first "
          f"(the first: {query_ms[0]:.1f})")
    lap("search")

    url = f"sqlite:///{home}/bench.sqlite"
    seed_demo(url, n=n_pipeline)
    registry = Registry()
    spec = RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                   target="bench_emb", master=f"local[{os.cpu_count()}]", launched_by="bench")
    # The pipeline's baseline: the in-process encoder on the pipeline's own texts, timed right before and right
    # after it, so that both see the same moment of a machine whose speed drifts over the bench's minutes.
    pipeline_texts = [p["description"] for p in products(n_pipeline) if p["description"] is not None]
    # And one single-threaded process per core on the same texts in the same key ranges, nothing of Spark around
    # them, also right before and after: the pipeline's factors below are then all measured on its own texts (on
    # the first 2,000 texts, the in-process encoder read 0.96 of its rate on these in one run, which the factors
    # did not show), and Spark's share is told apart from the ranges' (a task sorts only its range by length).
    with EncoderProcesses(n_pipeline, os.cpu_count() or 1, split=True) as split:  # idle during the run
        before, _ = measure(enc.encode, pipeline_texts, 1)
        split_before = split_rate(split)
        run, wall, first = timed_run(spec, registry)
        split_after = split_rate(split)
        after, _ = measure(enc.encode, pipeline_texts, 1)
    same_rows_speed, split_speed = (before + after) / 2, (split_before + split_after) / 2
    if run.state != "succeeded":
        print(f"pipeline failed: {run.error}")
        return 1
    print(f"cold_start_s = {first:.1f}  # launch to first vector committed, a spark-submit of its own")
    print(f"cold_start_stages = {stages_line(run)}")
    lap("pipeline, with its baselines")

    small, large = (200, 2000) if args.quick else (5000, 50_000)
    watch_s = 3 if args.quick else 60
    big_url = f"sqlite:///{home}/memory.sqlite"
    seed_demo(big_url, n=large)
    rss, driver_rss = {}, {}
    # The standing cluster through its own CLI, as an operator starts it (jobs/ never imports cluster/).
    master_port = free_port()
    # One worker per cpu, as many as the machine has: this cluster is the bench's own, in its own home.
    workers = os.cpu_count() or 1
    os.environ.update(EMBEDDECK_MASTER_PORT=str(master_port), EMBEDDECK_MASTER_WEBUI_PORT=str(free_port()),
                      EMBEDDECK_MAX_WORKERS=str(max(workers, Settings().integer("EMBEDDECK_MAX_WORKERS"))))
    master = f"spark://127.0.0.1:{master_port}"
    try:
        cluster_cli("up", "--workers", str(workers), "--no-runner")
        t0 = time.perf_counter()
        run_service.start(master)
        while "warm_s" not in (run_service.info() or {}) and time.perf_counter() - t0 < 180:
            time.sleep(0.2)  # the service loads the model in its workers before any run asks
        service_ready = time.perf_counter() - t0
        lap("standing cluster up, run service warm")
        warm_spec = RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                            target="bench_warm_emb", master=master, limit_rows=200, launched_by="bench")
        warm_run, _, warm_first = timed_run(warm_spec, registry)
        for n in (small, large):
            # On the run service the same Python workers serve both runs, so growth would show.
            # Titles: short texts make 50,000 rows affordable; what would grow with the table (rows
            # held, result sets, leaks) grows the same whatever the text length.
            mem_spec = RunSpec(db_url=big_url, source="products", id_column="id", text_column="title",
                               target=f"mem_{n}", master=master, limit_rows=n, launched_by="bench")
            rss[n], driver_rss[n] = peak_rss_mb(mem_spec, registry)
        lap("warm start and memory runs")
        # The same run on one one-core worker, then twice on two, then on one again, all twice: each count's rate
        # is the mean of four runs, in an order that cancels a steady drift of the machine's speed (once each in
        # QUICK, which must stay under 3 minutes: two first, on the workers the service warmed at its start, which
        # saves a scale-up and its warm-up). Two runs each read 1.77 once, as one two-worker run met a slow
        # minute of this shared machine (287.7 against 318.6 rows/s).
        scale_rates: dict[int, list[float]] = {}
        scale_cpu: dict[int, dict[str, float]] = {}  # workers: CPU seconds by role, wall, rows, rate windows
        for step, workers in enumerate((2, 1) if args.quick else (1, 2, 2, 1) * 2):
            have = service_executors()
            if have != workers:
                print(f"# scale step {step}: the service listed {have} executors, {workers} wanted", file=sys.stderr)
                scaled_at = time.time()
                cluster_cli("scale", str(workers))
                # The run service has exactly these executors (a removed one is gone), each holding the model. Only
                # executors the scale added get a warm-up; where the UI gave no count (-1), none is waited for.
                deadline = time.perf_counter() + 120
                while time.perf_counter() < deadline and (
                        service_executors() != workers
                        or (workers > have >= 0 and (run_service.info() or {}).get("warmed_at", 0) < scaled_at)):
                    time.sleep(0.2)
            scale_spec = RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                                 target=f"scale_{step}_{workers}w", master=master, limit_rows=n_scale,
                                 launched_by="bench")
            cpu_start, run_start = cpu_by_role(), time.perf_counter()
            scaled, _, _ = timed_run(scale_spec, registry)
            window = (scaled.ended_at - scaled.started_at).total_seconds()  # the rate's own
            spent = scale_cpu.setdefault(workers, {"wall": 0.0, "rows": 0.0, "run_s": 0.0})
            spent["wall"] += time.perf_counter() - run_start
            spent["rows"] += scaled.rows_done
            spent["run_s"] += window
            for role, seconds in cpu_by_role().items():
                spent[role] = spent.get(role, 0.0) + seconds - cpu_start[role]
            scale_rates.setdefault(workers, []).append(scaled.rows_done / window)
            lap(f"scale step {step}, {workers} workers")
        # As `make run` leaves it: zero workers and the autoscaler on; a launch wakes it.
        cluster_cli("scale", "0")
        history, started = scaling.ScaleHistory(registry), db.utcnow()
        autoscaler = subprocess.Popen([sys.executable, "-m", "cluster", "autoscale", "--min", "0", "--max", "2"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # The launch must wake the loop between its ticks, not meet its start: wait for its first tick's
            # sample (the count of workers then), and a second more for it to note the newest run and sleep.
            deadline, ticks = time.perf_counter() + 60, []
            while not ticks and time.perf_counter() < deadline:
                time.sleep(0.2)
                ticks = [s for s in history.samples(5) if s["at"] >= started]
            if not ticks:
                raise RuntimeError("the autoscaler recorded no tick within 60 s")
            time.sleep(1)
            workers_at_launch = ticks[0]["workers"]
            auto_spec = RunSpec(db_url=url, source="products", id_column="id", text_column="description",
                                target="bench_auto_emb", master=master, limit_rows=200, launched_by="bench")
            launched = db.utcnow()
            auto_run, _, auto_first = timed_run(auto_spec, registry)
            decisions = [e for e in history.events() if e["at"] >= launched - dt.timedelta(seconds=8)]
            lap("autoscaled start")
            # Watching, as `make run` leaves things after a run: the master and the run service up, the autoscaler
            # on and sampling, its workers idle until it scales them away.
            watch = dashboard_watch_cpu_pct(watch_s, home)
            lap("dashboard")
        finally:
            autoscaler.terminate()
            autoscaler.wait(10)
    finally:
        cluster_cli("down")
    lap("standing cluster down")
    print(f"service_warm_up_s = {service_ready:.1f}  # run service start until its workers hold the model")
    print(f"warm_start_s = {warm_first:.1f}  # the service's first run, launch to first vector committed")
    print(f"warm_start_stages = {stages_line(warm_run)}")
    print(f"autoscaled_start_s = {auto_first:.1f}  # {workers_at_launch} workers at launch, autoscaler on: launch "
          "to first vector committed")
    print(f"autoscaled_start_stages = {stages_line(auto_run)}")
    print("autoscaled_start_decisions = " + "; ".join(
        f"{(e['at'] - launched).total_seconds():+.1f} s: {e['from_workers']} -> {e['to_workers']} ({e['reason']})"
        for e in decisions))
    print(f"dashboard_watch_cpu_pct = {watch['product']:.1f}  # Streamlit server, one browser on the Cluster page "
          f"for {watch_s} s right after a run, autoscaler on; the product's .streamlit/config.toml")
    print(f"dashboard_watch_cpu_pct_file_watcher = {watch['file_watcher']:.1f}  # baseline: Streamlit's default "
          "file watcher")
    print(f"dashboard_watch_cpu_pct_floor = {watch['floor']:.1f}  # baseline: Streamlit's own server on a one-line "
          "page, the same config: what any page costs here")
    one_w, two_w = (float(np.mean(scale_rates[w])) for w in (1, 2))
    print(f"scale_1w_rows_per_s = {one_w:.1f}  # {n_scale} rows, one one-core worker, run service: the mean of "
          f"{', '.join(f'{r:.1f}' for r in scale_rates[1])} (a full bench runs 1, 2, 2, 1 workers in turn, twice)")
    print(f"scale_2w_rows_per_s = {two_w:.1f}  # the same run on two: the mean of "
          f"{', '.join(f'{r:.1f}' for r in scale_rates[2])}")
    print(f"scale_2w/1w = {two_w / one_w:.2f}  # against parallel_2p/1p = {two / one:.2f}, "
          "the machine's own")
    for workers in (1, 2):  # from launch to the end of each run: planning, the embedding job, the driver's polling
        print(f"scale_cpu_{workers}w = {cpu_line(scale_cpu[workers])}")
    # rows/s = the cores the workers got x the rows each of their CPU seconds encoded, so the ratio splits into
    # what the cluster's own processes left the workers and how fast each was (their CPU in planning, before a
    # rate's window opens, counts in both counts alike).
    cores, ms_per_row = ({w: scale_cpu[w]["Python workers"] / scale_cpu[w]["run_s"] for w in (1, 2)},
                         {w: 1000 * scale_cpu[w]["Python workers"] / scale_cpu[w]["rows"] for w in (1, 2)})
    print(f"scale_2w_worker_share = {scale_cpu[2]['Python workers'] / scale_cpu[2]['machine']:.2f}  # the Python "
          "workers' share of the busy CPU in the two-worker runs: with every cpu a worker's, the cluster's own "
          "processes take the rest from them (beside one worker they use an idle cpu)")
    print(f"scale_2w/1w_parts = cores {cores[2]:.2f} / {cores[1]:.2f} = {cores[2] / cores[1]:.2f} x CPU per row "
          f"{ms_per_row[1]:.2f} / {ms_per_row[2]:.2f} ms = {ms_per_row[1] / ms_per_row[2]:.2f}  # the cores the Python "
          "workers used on average over the runs' rows/s windows, two against one, times the CPU a row took them, "
          "one against two")
    print(f"worker_rss_{small / 1000:g}k_mb = {rss[small]:.0f}  # peak of one Spark Python worker during the run, "
          "product titles")
    print(f"worker_rss_{large / 1000:g}k_mb = {rss[large]:.0f}  # the same workers, after the smaller run")
    print(f"worker_rss_{large / 1000:g}k/{small / 1000:g}k = {rss[large] / rss[small]:.2f}")
    print(f"driver_rss_{small / 1000:g}k_mb = {driver_rss[small]:.0f}  # the run service's Python driver")
    print(f"driver_rss_{large / 1000:g}k/{small / 1000:g}k = {driver_rss[large] / driver_rss[small]:.2f}")

    embed_s = (run.ended_at - run.started_at).total_seconds()
    pipe_speed = run.rows_done / embed_s
    print(f"pipeline_rows = {run.rows_done}")
    print(f"pipeline_wall_s = {wall:.1f}  # launch to succeeded")
    print(f"pipeline_rows_per_s = {pipe_speed:.1f}  # embedding phase, SQLite -> Spark local -> SQLite")
    print(f"pipeline/raw_fp32 = {pipe_speed / raw_speed:.2f}")
    marks = json.loads(run.timings or "{}")
    print(f"pipeline_tasks_busy = {marks['tasks_busy_s'] / (os.cpu_count() * marks['embed_job_s']):.2f}  # of the "
          f"embedding job's {os.cpu_count()} x {marks['embed_job_s']:.1f} core-seconds, its tasks' share (reading, "
          f"encoding {marks['tasks_encoding_s'] / marks['tasks_busy_s']:.0%} of it, writing); the rest is Spark "
          "between tasks")
    busy_rate = run.rows_done / (marks["tasks_busy_s"] / os.cpu_count())
    print(f"encode_split_1t_texts_per_s = {split_speed:.1f}  # one single-threaded process per core on the "
          f"pipeline's texts, each its share of the run's key ranges, one at a time: {split_before:.1f} right "
          f"before the run, {split_after:.1f} after")
    print(f"pipeline_busy_rate/encode_split_1t = {busy_rate / split_speed:.2f}  # the tasks' rows/s while busy "
          "against those processes: what Spark's JVM and driver, and the run's reads and writes, take from them")
    print(f"pipeline_bound/raw = {split_speed / same_rows_speed:.2f}  # those processes against the in-process "
          "encoder on the same texts (which sorts them all at once): the most one single-threaded task per core "
          "on these ranges can reach")
    print(f"pipeline/default = {pipe_speed / default_speed:.2f}  # against default_texts_per_s, timed minutes "
          "earlier on the first texts")
    print(f"raw_same_rows_texts_per_s = {same_rows_speed:.1f}  # the in-process encoder on the pipeline's "
          f"{len(pipeline_texts)} texts: {before:.1f} right before the run, {after:.1f} right after")
    print(f"pipeline/raw = {pipe_speed / same_rows_speed:.2f}  # the Spark path against the same encoder alone in "
          "one process, on the same texts at the same moment")
    return 0


if __name__ == "__main__":
    # SIGTERM (`timeout`, a CI job cancelled) and SIGHUP ended the bench without its cleanup: its cluster (master,
    # workers, run service) ran on, and its home stayed behind.
    exit_with(main)
