"""Vector encodings per storage type: float32 little-endian bytes, or JSON for SQL Server VECTOR."""

from __future__ import annotations

import json

import numpy as np

from jobs.core.errors import BadRequest


def to_bytes(vector: np.ndarray) -> bytes:
    """Pack one vector as float32 little-endian (SQLite BLOB, bytea, VARBINARY)."""
    return np.asarray(vector, dtype="<f4").tobytes()


def from_bytes(blob: bytes, dim: int | None = None) -> np.ndarray:
    """Unpack float32 little-endian bytes; checks the dimension when given."""
    vector = np.frombuffer(blob, dtype="<f4")
    if dim is not None and vector.shape[0] != dim:
        raise BadRequest(f"a stored vector has {vector.shape[0]} dimensions, expected {dim}")
    return vector


def matrix_from_blobs(blobs: list[bytes], dim: int) -> np.ndarray:
    """Stack many packed vectors into one (n, dim) float32 matrix without a Python loop per value."""
    if not blobs:
        return np.empty((0, dim), dtype=np.float32)
    joined = b"".join(blobs)
    if len(joined) != len(blobs) * dim * 4:
        sizes = sorted({len(b) // 4 for b in blobs})
        raise BadRequest(f"stored vectors have {', '.join(map(str, sizes))} dimensions, expected {dim}: "
                         "the target holds vectors of another model")
    return np.frombuffer(joined, dtype="<f4").reshape(len(blobs), dim)


def to_json(vector: np.ndarray) -> str:
    """JSON array text, the input format of SQL Server 2025 VECTOR(n)."""
    return json.dumps([float(x) for x in np.asarray(vector, dtype=np.float32)])


def from_json(text: str, dim: int | None = None) -> np.ndarray:
    """Parse a VECTOR read back as JSON text; checks the dimension when given."""
    vector = np.asarray(json.loads(text), dtype=np.float32)
    if dim is not None and vector.shape[0] != dim:
        raise BadRequest(f"a stored vector has {vector.shape[0]} dimensions, expected {dim}")
    return vector
