"""BERT sentence encoder in plain torch, for sentence-transformers directories of the shape
Transformer (BERT) → mean Pooling → Normalize, such as all-MiniLM-L6-v2.

Why not sentence-transformers itself: importing it (and transformers' modelling code) pulls in
scikit-learn, SciPy and torch._dynamo, 7-11 s of a cold start in a Spark executor on 2 vCPUs; torch,
tokenizers and safetensors alone import in about 3 s. The vectors match sentence-transformers' to
cosine >= 0.99999 (tests/test_encoder.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from jobs.core.spec import DEFAULT_BATCH_SIZE

_TRANSFORMER = "sentence_transformers.models.Transformer"
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_POOL_MODES = ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
# Padded tokens per batch on CPU: batches of equal work rather than equal rows. Against 32 rows a batch, on the
# demo texts (~42 tokens) in fresh processes with the encoder's malloc settings: 6 % more texts/s at two
# threads, 1 % at one; 3,072 did best of 2,048-4,096, and 8,192 no better than 32 rows (activations outgrow
# the caches). Unmeasured on CUDA, where rows alone decide.
CPU_BATCH_TOKENS = 3072
# Texts per tokenizer thread at the least. 2,000 demo texts tokenized in 134 ms on one thread, 80-98 ms on two.
TOKENIZE_PART_TEXTS = 256
# Rows of every product on the packed path: the batch's tokens rounded up to a multiple of this, or to a power
# of two below it (packed_rows). oneDNN builds a kernel for each shape it meets (4.7 ms each on an AMX Xeon, four
# per batch width), which made a fresh process's first pass over 2,000 demo texts 20 % slower than its later
# ones; rounded, nearly every batch is 3,072 rows, and the first pass ran 1.15-1.28x as fast, later ones the
# same. Below 256 tokens a power of two: a one-text query on 256 rows took 10-11 ms, against 4 ms.
PACKED_ROW_STEP = 256
# _linear_pointwise's post-op and its algorithm: none, or exact (erf) GELU as BERT has it.
GELU_POST_OP = {False: ("none", [], ""), True: ("gelu", [], "none")}


def supports(path: str | Path) -> bool:
    """Whether the directory is a BERT + mean-pooling sentence-transformers model this module runs."""
    root = Path(path)
    try:
        modules = json.loads((root / "modules.json").read_text())
        config = json.loads((root / "config.json").read_text())
        pooling_dir = next(m["path"] for m in modules if m["type"] == _POOLING)
        pooling = json.loads((root / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return False
    types = [m.get("type") for m in modules]
    return (types in ([_TRANSFORMER, _POOLING], [_TRANSFORMER, _POOLING, _NORMALIZE])
            and modules[0].get("path", "") == ""
            and config.get("model_type") == "bert"
            and config.get("hidden_act") == "gelu"
            and config.get("position_embedding_type", "absolute") == "absolute"
            and pooling.get("pooling_mode_mean_tokens") is True
            and not any(pooling.get(f"pooling_mode_{mode}") for mode in _POOL_MODES)
            and (root / "model.safetensors").is_file() and (root / "tokenizer.json").is_file())


def forward_flops(token_counts: Iterable[int], hidden: int, layers: int, intermediate: int,
                  attention: bool = True) -> int:
    """FLOPs of the encoder's matrix products for texts of these token counts, padding excluded:
    the linear layers (2 per weight per token) and, unless attention is False, attention's two products
    (2·n²·hidden each)."""
    per_token = 2 * layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return sum(per_token * n + attention * layers * 4 * n * n * hidden for n in token_counts)


def packed_rows(tokens: int) -> int:
    """Rows of the products for a batch of this many tokens on the packed path: the next power of two up to
    PACKED_ROW_STEP, the next multiple of it beyond, so that a process meets at most a few dozen shapes."""
    if tokens <= PACKED_ROW_STEP:
        return 1 << max(0, tokens - 1).bit_length()
    return -(-tokens // PACKED_ROW_STEP) * PACKED_ROW_STEP


def bf16_packing_supported() -> bool:
    """Whether this torch and CPU run oneDNN bf16 products on packed weights."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class _Bert:
    """BERT forward pass over a dict of weight tensors: no nn.Module, so loading allocates nothing twice
    and initialises nothing (random init on the meta device imports torch._dynamo, 3 s)."""

    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor]):
        self.heads, self.eps, self.layers = cfg["num_attention_heads"], cfg["layer_norm_eps"], cfg["num_hidden_layers"]
        self.w = weights
        self.packed: torch.dtype | None = None  # the products' dtype once pack() held the weights for oneDNN
        # Attention's 1/sqrt(head size) folded into the query rows once, in fp32: no scaling pass per layer.
        # (The fused query-key-value tensors are _state_dict's own copies.)
        hidden = cfg["hidden_size"]
        for i in range(self.layers):
            for part in ("weight", "bias"):
                self.w[f"layers.{i}.qkv.{part}"][:hidden] *= (hidden // self.heads) ** -0.5

    def to(self, device: str, dtype: torch.dtype | None = None) -> _Bert:
        self.w = {k: t.to(device, dtype) for k, t in self.w.items()}
        return self

    def pack(self, dtype: torch.dtype) -> None:
        """Hold the linear layers as weights of this dtype packed once for oneDNN: bf16 products 6-13 % faster than
        on plain bf16 weights (autocast would re-cast fp32 ones at every call), fp32 ones 1.4x as fast as torch's
        (MKL) at two threads and 1.1-1.2x at one on an AVX2-only EPYC. Embeddings, residuals and layer norms stay
        fp32, which keeps cosine >= 0.9999 to fp32."""
        reorder = torch.ops.mkldnn._reorder_linear_weight
        linear = (".qkv.", ".attn_out.", ".up.", ".down.")
        self.w = {k: (reorder(t.to(dtype)) if k.endswith(".weight") else t.to(dtype))
                  if any(s in k for s in linear) else t for k, t in self.w.items()}
        self.packed = dtype

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str, gelu: bool = False) -> torch.Tensor:
        """x times the layer's weights plus its bias, then GELU where asked (fused into bf16 products: no pass of
        its own over the widest activations)."""
        if self.packed is not None:
            # oneDNN's fused GELU made fp32 up-projections 12 % slower than torch's own pass after them (AVX2 EPYC).
            fused = gelu and self.packed != torch.float32
            y = torch.ops.mkldnn._linear_pointwise(x.to(self.packed), self.w[name + ".weight"],
                                                   self.w[name + ".bias"], *GELU_POST_OP[fused])
            return torch.ops.aten.gelu_(y) if gelu and not fused else y
        y = F.linear(x, self.w[name + ".weight"], self.w[name + ".bias"])
        return F.gelu(y) if gelu else y

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of every head; mask is SDPA's boolean mask, or an additive fp32 one on the packed path."""
        if self.packed is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        # At a few dozen tokens and head size 32, torch's CPU flash kernel took twice the time of two batched
        # bf16 products around a softmax over fp32 scores (2.6 ms against 1.3 ms a layer at 32 x 44 tokens); on
        # fp32 (AVX2 EPYC, 64 x 48 tokens) 1.08x the time at two threads, 0.74x at one: the encoder 1.01x there.
        scores = torch.matmul(q, k.transpose(-1, -2)).float()
        if mask is not None:
            scores += mask
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of the last hidden states over the real tokens; mask None when no row is padded."""
        w = self.w
        b, n = ids.shape
        h = w["word"].shape[1]
        tokens = b * n
        # The hidden states are one matrix of `rows` rows, the last rows - tokens of them unused, so that the
        # products meet few shapes on the packed path (see PACKED_ROW_STEP).
        rows = tokens if self.packed is None else packed_rows(tokens)
        x = torch.empty(rows, h, device=ids.device, dtype=w["word"].dtype)
        x[tokens:] = 0
        x[:tokens] = (F.embedding(ids, w["word"]) + w["position"][:n] + w["token_type"][0]).view(tokens, h)
        x = self._norm(x, "norm")
        attn_mask = None if mask is None else mask[:, None, None, :]
        if attn_mask is not None and self.packed is not None:
            attn_mask = torch.zeros(attn_mask.shape, device=x.device).masked_fill_(~attn_mask, float("-inf"))
        ctx, heads = None, None
        for i in range(self.layers):
            p = f"layers.{i}."
            q, k, v = self._linear(x, p + "qkv")[:tokens].view(b, n, 3, self.heads, h // self.heads).permute(
                2, 0, 3, 1, 4)
            per_head = self._attention(q, k, v, attn_mask)
            if ctx is None:
                ctx = per_head.new_zeros(rows, h)
                heads = ctx[:tokens].view(b, n, self.heads, h // self.heads)
            heads.copy_(per_head.transpose(1, 2))
            x = self._norm(x + self._linear(ctx, p + "attn_out"), p + "attn_norm")
            x = self._norm(x + self._linear(self._linear(x, p + "up", gelu=True), p + "down"), p + "out_norm")
        x = x[:tokens].view(b, n, h)
        if mask is None:
            return x.mean(1)
        weights = mask.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def _state_dict(weights: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Map the checkpoint's BERT names (with or without a "bert." prefix) onto _Bert's."""
    w = {k.removeprefix("bert."): t for k, t in weights.items()}
    out = {"word": w["embeddings.word_embeddings.weight"],
           "position": w["embeddings.position_embeddings.weight"],
           "token_type": w["embeddings.token_type_embeddings.weight"],
           "norm.weight": w["embeddings.LayerNorm.weight"], "norm.bias": w["embeddings.LayerNorm.bias"]}
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            # One GEMM for query, key and value instead of three.
            out[dst + "qkv." + part] = torch.cat([w[f"{src}attention.self.{name}.{part}"]
                                                  for name in ("query", "key", "value")])
            out[dst + "attn_out." + part] = w[f"{src}attention.output.dense.{part}"]
            out[dst + "attn_norm." + part] = w[f"{src}attention.output.LayerNorm.{part}"]
            out[dst + "up." + part] = w[f"{src}intermediate.dense.{part}"]
            out[dst + "down." + part] = w[f"{src}output.dense.{part}"]
            out[dst + "out_norm." + part] = w[f"{src}output.LayerNorm.{part}"]
    return out


class BertSentenceEncoder:
    """Tokenizer plus BERT weights of one directory; encode() gives mean-pooled, unit-length vectors."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        root = Path(path)
        cfg = json.loads((root / "config.json").read_text())
        st_cfg_file = root / "sentence_bert_config.json"
        st_cfg = json.loads(st_cfg_file.read_text()) if st_cfg_file.is_file() else {}
        self.max_tokens = int(min(st_cfg.get("max_seq_length") or 512, cfg["max_position_embeddings"]))
        self.lowercase = bool(st_cfg.get("do_lower_case"))
        self.dim = int(cfg["hidden_size"])
        self.layers, self.intermediate = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
        self.device = device
        self.batch_tokens = CPU_BATCH_TOKENS if device == "cpu" else None
        # The file's own padding and truncation (fixed 128) are training settings, not ours.
        self.tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        weights = _state_dict(load_file(str(root / "model.safetensors")), cfg["num_hidden_layers"])
        self.model = _Bert(cfg, weights).to(device)

    def half(self) -> None:
        """Run in fp16 (CUDA)."""
        self.model.to(self.device, torch.float16)

    def pack(self, dtype: torch.dtype) -> bool:
        """Run the linear layers on weights of this dtype (bf16 or fp32) packed once for oneDNN, where this torch
        and CPU support it; False where they do not (bf16: the caller autocasts instead)."""
        supported = bf16_packing_supported() if dtype == torch.bfloat16 else torch.backends.mkldnn.is_available()
        if self.device != "cpu" or not supported:
            return False
        self.model.pack(dtype)
        return True

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, [CLS] and [SEP] included, truncated to max_tokens; long lists are split over
        torch's threads."""
        prepared = [t.strip().lower() if self.lowercase else t.strip() for t in texts]
        parts = max(1, min(torch.get_num_threads(), len(prepared) // TOKENIZE_PART_TEXTS))
        if parts == 1:
            return [e.ids for e in self.tokenizer.encode_batch(prepared)]
        # encode_batch releases the GIL; the library's own thread pool stays off (TOKENIZERS_PARALLELISM), as
        # it cannot survive a fork, and Spark's daemon forks its workers.
        step = -(-len(prepared) // parts)
        with ThreadPoolExecutor(parts) as pool:
            done = pool.map(self.tokenizer.encode_batch, [prepared[i:i + step] for i in range(0, len(prepared), step)])
            return [e.ids for part in done for e in part]

    def flops(self, texts: list[str], attention: bool = True) -> int:
        """FLOPs that encoding these texts takes at the least (no padding): the yardstick for a GEMM roofline;
        those of the linear layers alone when attention is False."""
        return forward_flops(map(len, self.token_ids(texts)), self.dim, self.layers, self.intermediate, attention)

    def batches(self, texts: list[str], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, list[int]]]:
        """(positions in texts, zero-padded token ids, token counts) per batch, longest texts first so that
        batches pad little: at most batch_size rows, and at most batch_tokens padded tokens where set."""
        ids = self.token_ids(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")
        start = 0
        while start < len(order):
            width = len(ids[order[start]])
            take = batch_size if self.batch_tokens is None else max(1, min(batch_size, self.batch_tokens // width))
            rows = order[start:start + take]
            lengths = [len(ids[i]) for i in rows]
            batch = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                batch[r, :lengths[r]] = ids[i]
            yield rows, batch, lengths
            start += len(rows)

    def encode_batches(self, texts: list[str], batch_size: int = DEFAULT_BATCH_SIZE,
                       normalize: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in texts, float32 mean-pooled vectors) batch by batch, unit-length unless normalize is
        False; the caller holds torch's inference mode around each step."""
        for rows, batch, lengths in self.batches(texts, batch_size):
            width = batch.shape[1]
            mask = None if lengths[-1] == width else (
                torch.arange(width, device=self.device) < torch.tensor(lengths, device=self.device)[:, None])
            pooled = self.model(torch.from_numpy(batch).to(self.device), mask).float()
            yield rows, (F.normalize(pooled, dim=-1) if normalize else pooled).cpu().numpy()
