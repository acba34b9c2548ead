"""The plain-torch BERT encoder against sentence-transformers itself, and the fallback for other models."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.core.spec import DEFAULT_BATCH_SIZE
from jobs.embed import bert
from jobs.embed.encoder import Encoder, cpu_flags, model_path
from tests.conftest import embeddings_endpoint, reference_vectors, wait_until

TRICKY = ["Hello world", "  padded with spaces  ", "x", "", "[PAD] [CLS] [SEP] [MASK] written out",
          "Ünïcödé, 東京, emoji 🙂 and tabs\tinside", "word " * 600,  # truncated at 256 tokens
          *(f"product {i}: a {'very ' * (i % 9)}fine thing with {i % 7} parts" for i in range(90))]


def tricky(batch_size: int) -> list[str]:
    """The texts a batch size is checked on. Batches of one take each text alone, so the written-out cases and a few
    generated ones say all (the 97 took 8-13 s a test in the suite)."""
    return TRICKY[:16] if batch_size == 1 else TRICKY


@pytest.fixture(scope="module")
def encoder():
    return Encoder("all-MiniLM-L6-v2", precision="fp32")


def test_default_model_runs_on_the_plain_torch_encoder(encoder):
    assert bert.supports(model_path("all-MiniLM-L6-v2"))
    assert isinstance(encoder.model, bert.BertSentenceEncoder)
    assert (encoder.dim, encoder.max_tokens) == (384, 256)


@pytest.mark.parametrize("batch_size", [1, 7, 64, DEFAULT_BATCH_SIZE])
def test_vectors_match_sentence_transformers_in_input_order(encoder, reference_model, batch_size):
    """fp32 products on weights packed once for oneDNN (wherever torch has it), as every CPU without bf16 units
    runs them."""
    assert encoder.model.model.packed == (torch.float32 if torch.backends.mkldnn.is_available() else None)
    texts = tricky(batch_size)
    got = encoder.encode(texts, batch_size=batch_size)
    want = reference_vectors(reference_model, texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    assert (got * want).sum(1).min() >= 0.99999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def unpacked_model():
    return bert.BertSentenceEncoder(model_path("all-MiniLM-L6-v2"))


@pytest.mark.parametrize("batch_size", [1, 64])
def test_unpacked_products_match_sentence_transformers(unpacked_model, reference_model, batch_size):
    """The path of a GPU, and of a torch without oneDNN: plain products and torch's own attention."""
    assert unpacked_model.model.packed is None
    texts = tricky(batch_size)
    with torch.inference_mode():
        got = np.empty((len(texts), 384), dtype=np.float32)
        for rows, vecs in unpacked_model.encode_batches(texts, batch_size):
            got[rows] = vecs
    assert (got * reference_vectors(reference_model, texts)).sum(1).min() >= 0.99999


@pytest.fixture(scope="module")
def bf16_encoder():
    return Encoder("all-MiniLM-L6-v2", precision="bf16")


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_bf16_vectors_stay_within_budget_of_sentence_transformers(bf16_encoder, reference_model, batch_size):
    """bf16 products with fp32 norms and residuals, on oneDNN-packed weights where this CPU has bf16 support;
    batches of 1 have no padding and take the unmasked path."""
    assert bf16_encoder.self_cast == bert.bf16_packing_supported()
    texts = tricky(batch_size)
    got = bf16_encoder.encode(texts, batch_size=batch_size)
    assert (got * reference_vectors(reference_model, texts)).sum(1).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("batch_size", [7, DEFAULT_BATCH_SIZE])
def test_cpu_batches_hold_at_most_batch_size_rows_and_the_token_budget(encoder, batch_size):
    """Every text once, longest first; a batch stops at batch_size rows or at the padded-token budget, whichever
    comes first, so short texts share big batches and the 256-token text shares a small one."""
    budget = encoder.model.batch_tokens
    assert budget == bert.CPU_BATCH_TOKENS
    batches = list(encoder.model.batches(TRICKY, batch_size))
    assert sorted(np.concatenate([rows for rows, _, _ in batches]).tolist()) == list(range(len(TRICKY)))
    widths = [ids.shape[1] for _, ids, _ in batches]
    assert widths == sorted(widths, reverse=True) and widths[0] == 256
    for rows, ids, lengths in batches:
        assert len(rows) == ids.shape[0] == len(lengths) <= batch_size
        assert ids.size <= budget
        assert lengths[0] == ids.shape[1] and all((ids[r, n:] == 0).all() for r, n in enumerate(lengths))
    sizes = [len(rows) for rows, _, _ in batches]
    assert sizes[0] == min(batch_size, budget // 256)
    if batch_size == DEFAULT_BATCH_SIZE:
        assert max(sizes) > 32  # short texts: more rows than the old fixed batch of 32


def test_packed_products_meet_few_shapes_and_waste_little():
    """A query keeps a handful of rows (a 256-row product made it 2.5x slower), a full batch at most 255 unused."""
    assert [bert.packed_rows(t) for t in (1, 2, 3, 12, 200, 256, 257, 2900, 3072)] == [
        1, 2, 4, 16, 256, 256, 512, 3072, 3072]
    rows = [bert.packed_rows(t) for t in range(1, bert.CPU_BATCH_TOKENS + 1)]
    # Powers of two below the step, then its multiples: 1, 2, ..., 128, 256, 512, ..., 3,072.
    assert len(set(rows)) == 8 + bert.CPU_BATCH_TOKENS // bert.PACKED_ROW_STEP
    assert all(t <= r < max(2 * t, t + bert.PACKED_ROW_STEP) for t, r in enumerate(rows, 1))


def test_token_counts_match_the_reference_tokenizer_after_truncation(encoder, reference_model):
    want = [len(ids) for ids in reference_model.tokenizer(TRICKY, truncation=True, max_length=256)["input_ids"]]
    assert encoder.count_tokens(TRICKY) == sum(want)
    assert max(want) == 256


def test_other_pooling_falls_back_to_sentence_transformers(tmp_path: Path, reference_model):
    src = Path(model_path("all-MiniLM-L6-v2"))
    model_dir = tmp_path / "cls-model"
    shutil.copytree(src, model_dir, ignore=shutil.ignore_patterns("model.safetensors"))
    (model_dir / "model.safetensors").symlink_to(src / "model.safetensors")
    pooling = model_dir / "1_Pooling" / "config.json"
    cfg = json.loads(pooling.read_text()) | {"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}
    pooling.write_text(json.dumps(cfg))

    assert not bert.supports(model_dir)
    enc = Encoder(str(model_dir), precision="fp32")
    assert not isinstance(enc.model, bert.BertSentenceEncoder)
    from sentence_transformers import SentenceTransformer

    want = reference_vectors(SentenceTransformer(str(model_dir), device="cpu"), TRICKY[:10])
    assert (enc.encode(TRICKY[:10]) * want).sum(1).min() >= 0.99999
    # and CLS pooling really is a different model from the default's mean pooling
    assert (enc.encode(TRICKY[:10]) * reference_vectors(reference_model, TRICKY[:10])).sum(1).min() < 0.999


def test_loading_the_default_model_imports_neither_transformers_nor_sentence_transformers():
    code = ("import sys; from jobs.embed.encoder import Encoder; Encoder('all-MiniLM-L6-v2').encode(['hi']); "
            "heavy = ('sentence_transformers', 'transformers', 'sklearn', 'scipy'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_long_list_is_tokenized_over_torchs_threads_and_keeps_its_order(encoder, monkeypatch):
    import torch

    model, texts = encoder.model, TRICKY * 3
    monkeypatch.setattr(bert, "TOKENIZE_PART_TEXTS", len(texts) + 1)
    want = model.token_ids(texts)
    calls = []

    class CountingTokenizer:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def encode_batch(self, batch):
            calls.append(len(batch))
            return self.tokenizer.encode_batch(batch)

    monkeypatch.setattr(model, "tokenizer", CountingTokenizer(model.tokenizer))
    monkeypatch.setattr(bert, "TOKENIZE_PART_TEXTS", 50)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        got = model.token_ids(texts)
    finally:
        torch.set_num_threads(threads)
    assert got == want
    assert len(calls) == 3 and sum(calls) == len(texts)


@pytest.mark.parametrize("texts", [["x"], ["a fairly ordinary product description"], TRICKY[:12]])
def test_flop_count_matches_torchs_counter_for_the_linear_layers(unpacked_model, texts):
    """On the unpacked path, whose products torch's counter sees (oneDNN's packed ones it does not)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, counts = unpacked_model, [len(ids) for ids in unpacked_model.token_ids(texts)]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        for ids in model.token_ids(texts):  # one text per forward: no padding to count
            model.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
    attention = sum(6 * 4 * n * n * 384 for n in counts)  # torch counts no CPU flash attention
    assert model.flops(texts, attention=False) == counter.get_total_flops()
    assert model.flops(texts) == counter.get_total_flops() + attention


def test_every_spelling_of_one_model_shares_one_encoder_and_the_cache_is_bounded(fast_model, tmp_path, monkeypatch):
    """Seven spellings of one model path once took the API from 95 to 809 MB: encoders are keyed by the
    resolved directory, and at most CACHE_SIZE stay loaded."""
    from jobs.embed import encoder as enc

    monkeypatch.setattr(enc, "_CACHE", type(enc._CACHE)())
    spellings = [fast_model, fast_model + "/", str(Path(fast_model) / ".." / Path(fast_model).name),
                 str(Path(fast_model) / "1_Pooling" / "..")]
    assert len({id(enc.get_encoder(m)) for m in spellings}) == 1
    copies = []
    for i in range(enc.CACHE_SIZE + 2):
        copy = tmp_path / f"copy{i}"
        shutil.copytree(fast_model, copy)
        copies.append(enc.get_encoder(str(copy)))
    assert len(enc._CACHE) == enc.CACHE_SIZE
    assert enc.get_encoder(str(tmp_path / f"copy{enc.CACHE_SIZE + 1}")) is copies[-1]  # the newest stays


def test_threads_asking_for_one_model_at_once_share_one_load(monkeypatch):
    """The API's and the dashboard's threads: without the cache's lock each one loaded its own copy."""
    from concurrent.futures import ThreadPoolExecutor

    from jobs.embed import encoder as enc

    monkeypatch.setattr(enc, "_CACHE", type(enc._CACHE)())
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: enc.get_encoder("all-MiniLM-L6-v2"), range(4)))
    assert len({id(e) for e in got}) == 1 and len(enc._CACHE) == 1


def test_a_stalled_remote_endpoint_holds_no_one_asking_for_another_model():
    """A remote encoder probes its endpoint when it is made; meanwhile a loaded model is handed out at once."""
    import threading
    import time

    from jobs.embed import encoder as enc

    local = enc.get_encoder("all-MiniLM-L6-v2")
    release = threading.Event()
    url, server = embeddings_endpoint(lambda texts: release.wait(10) and [[1.0, 0.0]] * len(texts))
    try:
        probe = threading.Thread(target=enc.get_encoder, args=("stalled",), kwargs={"endpoint": url})
        probe.start()
        time.sleep(0.5)  # the probe's request is in flight: the endpoint answers when released
        t0 = time.monotonic()
        assert enc.get_encoder("all-MiniLM-L6-v2") is local
        waited = time.monotonic() - t0
        release.set()
        probe.join(60)
        assert waited < 5, waited
    finally:
        release.set()
        server.shutdown()


def test_bench_roofline_and_time_shares_follow_the_encoders_own_products(encoder, bf16_encoder):
    """`make bench` times the products in the encoder's precision and finds the linear layers among the
    profiler's operators on both paths (a renamed operator would leave that group empty and the bench's
    linear_layers/gemm_ceiling line dividing by zero)."""
    from jobs.doors.bench import gemm_gflops, paired_linear, time_shares

    for enc in (encoder, bf16_encoder):
        assert gemm_gflops(enc, rows=64, windows=1, seconds=0.05) > 0
        line, linear_s = time_shares(enc, TRICKY[:20])
        assert linear_s > 0 and "linear layers" in line
        line, ratio = paired_linear(enc, TRICKY[:20], rounds=1)
        assert ratio > 0 and "linear layers" in line


def test_bench_runs_the_other_engines_on_our_tokens_and_batches(fast_model):
    """The bench's OpenVINO and ONNX Runtime figures encode the same model to the same vectors as ours (the
    TRICKY texts: empty, truncated, padded batches), and OpenVINO's usage reporting never loads. (The tiny model:
    both engines convert whatever BERT they are given, and the real one took 8-16 s here.)"""
    from jobs.doors.bench import other_engines

    results = other_engines(Encoder(fast_model, precision="fp32"), TRICKY, rounds=1)
    assert set(results) == {"openvino_fp32", "onnxruntime_fp32"}
    for rate, ratio, cosine in results.values():
        assert rate > 0 and ratio > 0 and cosine >= 0.9999
    assert sys.modules.get("openvino_telemetry") is None


def test_bench_peak_memory_is_the_searching_process_own_not_its_parents():
    """search_peak_rss_mb once read getrusage's ru_maxrss, which Linux carries across exec from the spawning
    process: a child of a 300 MB parent reported 300 MB."""
    held = np.ones(300 * 2**20 // 8)  # the parent's 300 MB, resident
    child = subprocess.run([sys.executable, "-c", "from jobs.doors.bench import own_peak_rss_mb; "
                                                  "print(own_peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert held.sum() > 0 and 5 < float(child.stdout) < 150


def test_bench_encoder_processes_load_once_and_each_encodes_its_share_of_the_ranges_every_time_asked():
    """The bench's single-threaded processes are loaded once and timed on demand (before and after the pipeline
    run): split, each encodes the key ranges one task per core takes, together all the run's texts, and asked
    again it encodes them again; its ceiling answer is a ratio; at the end of input each exits cleanly."""
    from jobs.core import plan
    from jobs.doors.bench import EncoderProcesses, split_rate
    from jobs.store.demo import products

    n = 300
    texts = [p["description"] for p in products(n) if p["description"] is not None]
    ends = plan.split_ends(len(texts), plan.default_partitions(2, len(texts)))
    sizes = [b - a for a, b in zip([-1] + ends, ends)]
    shares = [sum(sizes[i::2]) for i in range(2)]
    with EncoderProcesses(n, 2, split=True) as split:
        for _ in range(2):
            answers = split.ask("rate")
            assert [count for _, count in answers] == shares and sum(shares) == len(texts)
            assert all(rate > 0 for rate, _ in answers)
        assert 0 < split.ask("ceiling", [1])[0][0] < 2
        assert split_rate(split) > 0
    assert [p.returncode for p in split.procs] == [0, 0]


def test_a_bench_stopped_by_sigterm_cleans_up_as_one_that_ends(tmp_path):
    """`timeout 100 make bench` (or a cancelled CI job) ended the bench without its cleanup: the cluster it had
    started (master, workers, run service) ran on, and its home stayed in the temporary folder."""
    import os

    proc = subprocess.Popen([sys.executable, "-m", "jobs.doors.bench", "--quick"], env=dict(os.environ,
                            TMPDIR=str(tmp_path)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: list(tmp_path.glob("embeddeck-bench-*")), timeout=120, what="the bench's home")
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert not list(tmp_path.glob("embeddeck-bench-*"))


def test_bench_asks_the_run_service_for_executors_and_says_when_it_cannot(tmp_path, monkeypatch):
    """The scale step acts on the count the run service's Spark UI gives, and only on one it gave: with no
    service (no UI to ask), -1 after the asks, never 0 or a stale count."""
    from jobs.doors.bench import service_executors

    monkeypatch.setenv("EMBEDDECK_HOME", str(tmp_path))  # a home where no run service ever ran

    assert service_executors(tries=2) == -1


@pytest.mark.parametrize("env", [
    pytest.param({}, id="default"),
    # Where the CPU has no AVX-512 the default case is this one (fp32 on AVX2 kernels): not run twice.
    pytest.param({"EMBEDDECK_PRECISION": "fp32", "ONEDNN_MAX_CPU_ISA": "AVX2"}, id="fp32-on-avx2-kernels",
                 marks=pytest.mark.skipif("avx512f" not in cpu_flags(),
                                          reason="the default case runs fp32 on AVX2 kernels here")),
])
def test_a_repeated_encode_reuses_freed_memory_instead_of_faulting_it_in_again(env):
    """glibc's malloc gave each batch's activations back to the OS, so every batch mapped and zeroed them afresh
    (in bf16 about 200 page faults a text, in fp32 10-45, every encode); the encoder's process keeps them for
    the next batch: once its heap has grown to a batch's peak (two encodes), almost none. The fp32 products on
    oneDNN's AVX2 kernels (those of CPUs without AVX-512, chosen here on any x86 CPU) grow the heap most."""
    code = """
import resource
from jobs.embed.encoder import Encoder
from jobs.store.demo import products
texts = [p["description"] for p in products(512)]
encoder = Encoder("all-MiniLM-L6-v2")
encoder.encode(texts)
encoder.encode(texts)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
encoder.encode(texts)
encoder.encode(texts)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, **env})
    # Two encodes counted: without the settings ~100,000 an encode (103,638 once); with them 0-10 mostly, and now and
    # then 600-1,200 when a block of a few MB is mapped afresh (a bound of 512 failed on that once in CI). 20 a text
    # is 10x below. With a 64 MiB trim threshold the fp32 AVX2 one took up to 54,000 an encode: failed 2 runs of 3.
    assert int(out.stdout.split()[-1]) < 20 * 2 * 512, out.stdout + out.stderr


def test_a_task_commits_its_shortest_rows_first_then_whole_batches_of_at_least_the_commit_rows(fast_model,
                                                                                               fast_reference):
    """What a Spark task commits (jobs/embed/pipeline.py): its FIRST_COMMIT_ROWS shortest rows alone, then one pass
    of batches over the rest of the chunk, gathered into commits of at least 256 rows; every row once, same
    vectors. (The tiny model: what is committed when does not depend on the model, and the real one took 13-38 s
    here.)"""
    from jobs.core import plan
    from jobs.embed.pipeline import commit_groups
    from jobs.store.demo import products

    encoder = Encoder(fast_model, precision="fp32")
    texts = sorted((p["description"] for p in products(700)), key=len)
    groups = list(commit_groups(encoder, texts, DEFAULT_BATCH_SIZE, first_commit=True))
    sizes = [len(positions) for positions, _ in groups]
    assert sizes[0] == plan.FIRST_COMMIT_ROWS and set(groups[0][0]) == set(range(plan.FIRST_COMMIT_ROWS))
    assert all(size >= plan.COMMIT_ROWS for size in sizes[1:-1]) and sum(sizes) == len(texts) and len(groups) >= 3
    positions = np.concatenate([p for p, _ in groups])
    assert sorted(positions) == list(range(len(texts)))
    got = np.empty((len(texts), encoder.dim), dtype=np.float32)
    got[positions] = np.concatenate([v for _, v in groups])
    assert (got * reference_vectors(fast_reference, texts)).sum(1).min() >= 0.99999
    later = list(commit_groups(encoder, texts[:300], DEFAULT_BATCH_SIZE, first_commit=False))
    assert len(later[0][0]) >= plan.COMMIT_ROWS  # no small first commit after the task's first


@pytest.mark.parametrize("refusal", [413, 422, 400])
def test_a_remote_endpoint_that_refuses_large_requests_gets_them_in_halves(refusal):
    """An endpoint whose batch limit is below ours (Hugging Face TEI refuses more than 32 inputs by default with 422;
    NIMs take 16-64) failed the whole run. A refused request is sent again in halves, and later ones no larger;
    a single text refused is still an error that names the endpoint."""
    from jobs.core.errors import Unavailable
    from jobs.embed.encoder import RemoteEncoder

    url, server = embeddings_endpoint(lambda texts: [[1.0, float(len(t)), 0.5] for t in texts], most_texts=40,
                                      refusal=refusal)
    try:
        enc = RemoteEncoder(url, "tiny", name="small-batches")
        texts = [f"text number {i}" + "!" * (i % 5) for i in range(300)]
        got = enc.encode(texts)
        lengths = np.array([len(t) for t in texts], dtype=np.float32)
        expected = np.stack([np.ones(300), lengths, np.full(300, 0.5)], axis=1)
        assert np.allclose(got, expected / np.linalg.norm(expected, axis=1, keepdims=True))  # every row its own
        assert server.refused == [256, 128, 64] and enc.max_batch == 32
        enc.encode(texts)
        assert server.refused == [256, 128, 64]  # learned once
    finally:
        server.shutdown()
    url, server = embeddings_endpoint(lambda texts: [[1.0, 0.0]] * len(texts), most_texts=0, refusal=refusal)
    try:
        with pytest.raises(Unavailable, match=f"endpoint 'none-at-all' answered HTTP {refusal}"):
            RemoteEncoder(url, "tiny", name="none-at-all")
    finally:
        server.shutdown()


def test_a_remote_endpoint_that_answers_fewer_embeddings_than_texts_is_named_not_misread():
    """A real HTTP endpoint that drops texts: the probe and a later request each fail with what happened, instead
    of an IndexError or vectors shifted onto the wrong rows."""
    from jobs.core.errors import Unavailable
    from jobs.embed.encoder import RemoteEncoder

    at_most = [2]
    url, server = embeddings_endpoint(lambda texts: [[1.0, 0.0, 0.5]] * min(len(texts), at_most[0]))
    try:
        enc = RemoteEncoder(url, "tiny", name="dropper")
        assert enc.dim == 3 and enc.encode(["a", "b"]).shape == (2, 3)
        with pytest.raises(Unavailable, match="'dropper' answered 2 embeddings for 5 texts"):
            enc.encode(list("abcde"))
        at_most[0] = 0
        with pytest.raises(Unavailable, match="'dropper' answered 0 embeddings for 1 texts"):
            RemoteEncoder(url, "tiny", name="dropper")
    finally:
        server.shutdown()
