"""Exact top-k cosine search over a target's stored vectors."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa

from jobs import db, vectors
from jobs.encoder import get_encoder
from jobs.spec import SpecError

SCAN_CHUNK_ROWS = 20_000


@dataclass
class Hit:
    """One result row."""

    id: int
    score: float
    text: str | None


@dataclass
class SearchResult:
    """Hits plus what an operator needs to trust them."""

    hits: list[Hit]
    model: str
    stored_models: list[str]
    encode_ms: float
    search_ms: float
    warnings: list[str] = field(default_factory=list)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, id) pairs, best first, without sorting everything."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        scores, ids = scores[part], ids[part]
    order = np.argsort(-scores, kind="stable")
    return scores[order], ids[order]


def scan_top_k(engine: sa.Engine, target: sa.Table, query: np.ndarray, k: int,
               chunk_rows: int = SCAN_CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Stream the target in key order, keeping only the running top k: memory is one chunk."""
    best_s, best_i = np.empty(0, np.float32), np.empty(0, np.int64)
    after = None
    dim = query.shape[0]
    while True:
        q = sa.select(target.c.source_id, target.c.embedding).order_by(target.c.source_id).limit(chunk_rows)
        if after is not None:
            q = q.where(target.c.source_id > after)
        with engine.connect() as conn:
            rows = conn.execute(q).all()
        if not rows:
            break
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        if isinstance(target.c.embedding.type, db.MSSQLVector):
            mat = np.stack([vectors.from_json(r[1]) for r in rows])
        else:
            mat = vectors.matrix_from_blobs([r[1] for r in rows], dim)
        norms = np.linalg.norm(mat, axis=1)
        scores = (mat @ query) / np.where(norms == 0, 1, norms)
        best_s, best_i = top_k(np.concatenate([best_s, scores.astype(np.float32)]),
                               np.concatenate([best_i, ids]), k)
        after = int(ids[-1])
    return best_s, best_i


def mssql_search_statement(target: sa.Table, dim: int, k: int) -> sa.TextClause:
    """SQL Server 2025 pushdown: the database ranks by VECTOR_DISTANCE itself."""
    from sqlalchemy.dialects import mssql

    prep = mssql.dialect().identifier_preparer
    return sa.text(
        f"SELECT TOP ({int(k)}) {prep.quote('source_id')} AS source_id, "
        f"VECTOR_DISTANCE('cosine', {prep.quote('embedding')}, CAST(:query AS VECTOR({int(dim)}))) AS distance "
        f"FROM {prep.format_table(target)} ORDER BY distance"
    )


def fetch_texts(engine: sa.Engine, origin: dict | None, ids: list[int]) -> dict[int, str]:
    """Source text of the given ids, when the target's source is known."""
    if not origin or not ids:
        return {}
    source = db.reflect(engine, origin["source"], "source")
    id_col, text_col = source.c[origin["id_column"]], source.c[origin["text_column"]]
    with engine.connect() as conn:
        return {int(i): t for i, t in conn.execute(sa.select(id_col, text_col).where(id_col.in_(ids)))}


def search(db_url: str, target_name: str, query: str, k: int = 10, model: str | None = None) -> SearchResult:
    """Embed query with the target's model and return the k most similar rows with their text."""
    if not query or not query.strip():
        raise SpecError("query text is empty")
    if not 1 <= k <= 1000:
        raise SpecError(f"k must be between 1 and 1000, not {k}")
    engine = db.check_connection(db_url)
    target = db.reflect(engine, target_name, "target")
    db.check_target(target, engine)
    stored = db.target_models(engine, target)
    origin = db.target_origin(engine, target_name)
    use_model = model or (stored[0] if len(stored) == 1 else (origin or {}).get("model")) or "all-MiniLM-L6-v2"
    warnings = []
    if stored and use_model not in stored:
        warnings.append(f"query model {use_model} differs from the stored vectors' model "
                        f"{', '.join(stored)}: scores are not meaningful")
    elif len(stored) > 1:
        warnings.append(f"target holds vectors of several models ({', '.join(stored)})")
    t0 = time.perf_counter()
    qvec = get_encoder(use_model).encode([query])[0]
    t1 = time.perf_counter()
    if engine.dialect.name == "mssql" and isinstance(target.c.embedding.type, db.MSSQLVector):
        with engine.connect() as conn:
            rows = conn.execute(mssql_search_statement(target, len(qvec), k),
                                {"query": vectors.to_json(qvec)}).all()
        scores = np.array([1.0 - r.distance for r in rows], dtype=np.float32)
        ids = np.array([r.source_id for r in rows], dtype=np.int64)
    else:
        scores, ids = scan_top_k(engine, target, qvec, k)
    t2 = time.perf_counter()
    texts = fetch_texts(engine, origin, [int(i) for i in ids])
    hits = [Hit(int(i), float(s), texts.get(int(i))) for s, i in zip(scores, ids)]
    return SearchResult(hits, use_model, stored, (t1 - t0) * 1000, (t2 - t1) * 1000, warnings)
