"""GPU device check (`python -m jobs.doors.gpu_check`): CUDA fp16 texts/s on short and long texts, cosine to fp32.

One command, a few minutes on one GPU. Prints `name = value` lines; exits 2 when no CUDA device exists.
Target: >= 10,000 short texts/s on one H200, min cosine >= 0.9999 to fp32.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def texts(n: int, long: bool) -> list[str]:
    from jobs.store.demo import products

    base = [p["description"] for p in products(n)]
    return [" ".join([t] * 12) for t in base] if long else base


def rate(encode, batch: list[str], batch_size: int, rounds: int = 3) -> tuple[float, np.ndarray]:
    """Median texts/s of encode(texts, batch_size) over rounds, after a warm-up batch."""
    import torch

    encode(batch[:batch_size], batch_size)
    speeds, out = [], None
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = encode(batch, batch_size)
        torch.cuda.synchronize()
        speeds.append(len(batch) / (time.perf_counter() - t0))
    return float(np.median(speeds)), out


def main() -> int:
    import torch
    from sentence_transformers import SentenceTransformer

    from jobs.embed.encoder import Encoder, model_path

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"device = {torch.cuda.get_device_name(0)}")
    path = model_path("all-MiniLM-L6-v2")
    # Baseline: sentence-transformers in fp32; measured: the product's encoder in fp16.
    reference = SentenceTransformer(path, device="cuda")
    product = Encoder("all-MiniLM-L6-v2", precision="fp16")
    print(f"encoder = {type(product.model).__name__} {product.precision.device} {product.precision.dtype}")

    def fp32(texts: list[str], batch_size: int) -> np.ndarray:
        return reference.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)

    def fp16(texts: list[str], batch_size: int) -> np.ndarray:
        return product.encode(texts, batch_size=batch_size)

    for label, n, long, bs in (("short", 50_000, False, 1024), ("long", 10_000, True, 256)):
        batch = texts(n, long)
        s32, v32 = rate(fp32, batch, bs)
        s16, v16 = rate(fp16, batch, bs)
        print(f"{label}_fp32_texts_per_s = {s32:.0f}")
        print(f"{label}_fp16_texts_per_s = {s16:.0f}")
        print(f"{label}_fp16/fp32 = {s16 / s32:.2f}")
        print(f"{label}_min_cosine = {(v32 * v16).sum(1).min():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
