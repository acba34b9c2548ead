"""Top-k cosine search over a target's stored vectors: exact for small targets, an IVF index for large ones."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np
import sqlalchemy as sa

from jobs.core import vectors
from jobs.core.errors import BadRequest
from jobs.core.settings import Settings
from jobs.embed.encoder import absolute_model, get_encoder
from jobs.store import db, endpoints

SCAN_CHUNK_ROWS = 20_000


@dataclass
class Hit:
    """One result row; a UUID id is shown as its text."""

    id: int | str
    score: float
    text: str | None


def shown_id(key) -> int | str:
    """A key as hits carry it: integers (NUMERIC(p, 0) too) as numbers, anything else (text, UUIDs) as text."""
    if isinstance(key, Decimal) and key == key.to_integral_value():
        return int(key)
    return key if isinstance(key, int | str) else str(key)


def key_array(keys: list) -> np.ndarray:
    """Source ids as an array: int64 for integer keys, objects (text, UUIDs) otherwise."""
    if keys and isinstance(keys[0], int):
        return np.fromiter(keys, np.int64, count=len(keys))
    array = np.empty(len(keys), dtype=object)
    array[:] = keys
    return array


@dataclass
class SearchResult:
    """Hits plus what an operator needs to trust them."""

    hits: list[Hit]
    model: str
    stored_models: list[str]
    encode_ms: float
    search_ms: float
    warnings: list[str] = field(default_factory=list)
    load_ms: float = 0.0  # loading the model: a process's first query with it (1-1.5 s here), 0 after


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
    best_s, best_i = np.empty(0, np.float32), np.empty(0, np.int64)  # takes the keys' kind at the first join
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
        ids = key_array([r[0] for r in rows])
        if isinstance(target.c.embedding.type, db.MSSQLVector):
            mat = np.stack([vectors.from_json(r[1]) for r in rows])
        else:
            mat = vectors.matrix_from_blobs([r[1] for r in rows], dim)
        norms = np.linalg.norm(mat, axis=1)
        scores = (mat @ query) / np.where(norms == 0, 1, norms)
        best_s, best_i = top_k(np.concatenate([best_s, scores.astype(np.float32)]),
                               np.concatenate([best_i, ids]), k)
        after = rows[-1][0]
    return best_s, best_i


class VectorIndex:
    """A target's vectors held in memory for fast search, kept current as runs upsert.

    Each query first asks the database for (count, latest embedded_at): unchanged means no I/O beyond that;
    newer rows are read by embedded_at (indexed) and added, replacing what they update; a shrunken table
    reloads. Up to EMBEDDECK_SEARCH_EXACT_ROWS vectors are searched exactly (one float32 copy,
    100k × 384 ≈ 147 MiB); beyond that an approximate index (faiss IVF with 8-bit scalar quantization,
    384 bytes a vector: 1M ≈ 370 MiB) answers in milliseconds. Both are capped by EMBEDDECK_SEARCH_CACHE_MB;
    larger targets are searched by streaming instead. Rows are read in chunks: no full float copy is built.
    faiss labels vectors with int64s: integer keys are their own labels, other keys (text, UUIDs) are numbered
    in this process.
    """

    # Counting a table's rows scans it (about 50 ms for 1M rows in SQLite): the latest embedded_at (indexed)
    # is checked at every query, the count (which reveals deletes) at most this often.
    count_every_s = 2.0

    def __init__(self, engine: sa.Engine, target: sa.Table, dim: int):
        self.engine, self.target, self.dim = engine, target, dim
        # Held across a refresh and its search: the API's and the dashboard's threads search one target at once,
        # and a refresh swaps what the search reads (each thread once loaded the whole table for itself).
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.ids = np.empty(0, np.int64)  # object once text or UUID keys are joined to it
        self.matrix = np.empty((0, self.dim), np.float32)
        self.position: dict = {}
        self.keys: list = []  # the approximate index's labels' keys, where keys are not integers
        self.label_of: dict = {}
        self.ann = None  # the approximate index, once the target outgrows exact search
        self.count, self.watermark, self.counted_at = 0, None, -np.inf

    @property
    def nbytes(self) -> int:
        """Memory the vectors take (what the cache budget counts)."""
        if self.ann is not None:
            return self.ann.ntotal * (self.dim + 8) + len(self.keys) * KEY_BYTES
        return self.matrix.nbytes + self.ids.nbytes

    @property
    def size(self) -> int:
        return self.ann.ntotal if self.ann is not None else len(self.ids)

    def _state(self) -> tuple[int, object]:
        t = self.target
        with self.engine.connect() as conn:
            return tuple(conn.execute(sa.select(sa.func.count(), sa.func.max(t.c.embedded_at))).one())

    def _latest(self):
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(self.target.c.embedded_at))).scalar()

    def chunks(self, since, limit: int | None = None):
        """(ids, unit-length float32 vectors, latest embedded_at) per chunk of rows at or after since."""
        t = self.target
        q = sa.select(t.c.source_id, t.c.embedding, t.c.embedded_at)
        if since is not None:
            q = q.where(t.c.embedded_at >= since)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            for part in conn.execute(q.execution_options(yield_per=SCAN_CHUNK_ROWS)).partitions():
                ids = key_array([r[0] for r in part])
                if isinstance(t.c.embedding.type, db.MSSQLVector):
                    mat = np.stack([vectors.from_json(r[1]) for r in part]).astype(np.float32)
                else:
                    mat = vectors.matrix_from_blobs([r[1] for r in part], self.dim).copy()
                norms = np.linalg.norm(mat, axis=1, keepdims=True)
                mat /= np.where(norms == 0, 1, norms)
                yield ids, mat, max(r[2] for r in part)

    def _add_exact(self, ids: np.ndarray, mat: np.ndarray) -> None:
        keys = ids.tolist()
        fresh = [i for i, key in enumerate(keys) if key not in self.position]
        for i, key in enumerate(keys):
            if key in self.position:
                self.matrix[self.position[key]] = mat[i]
        if fresh:
            start = len(self.ids)
            self.ids = np.concatenate([self.ids, ids[fresh]])
            self.matrix = np.concatenate([self.matrix, mat[fresh]])
            for offset, i in enumerate(fresh):
                self.position[keys[i]] = start + offset

    def _labels(self, ids: np.ndarray) -> np.ndarray:
        """The approximate index's int64 labels of these keys: integer keys are their own, others are numbered."""
        if ids.dtype != object:
            return ids
        for key in ids.tolist():
            if key not in self.label_of:
                self.label_of[key] = len(self.keys)
                self.keys.append(key)
        return np.fromiter((self.label_of[key] for key in ids.tolist()), np.int64, count=len(ids))

    def _train_ann(self, count: int) -> None:
        """An IVF index with lists for this many vectors, trained on a sample of the table's own."""
        import faiss

        lists = int(min(4096, max(8, 2 * count ** 0.5)))
        sample = np.concatenate([m for _, m, _ in self.chunks(None, limit=min(count, 40 * lists))])
        ann = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(self.dim), self.dim, lists,
                                            faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        ann.train(sample)
        ann.nprobe = max(8, lists // 48)  # ~2 % of the lists: recall@10 ≥ 0.95 on 1M (make bench)
        self.ann = ann

    def _load(self, since) -> None:
        for ids, mat, latest in self.chunks(since):
            if self.ann is not None:
                labels = self._labels(ids)
                if since is not None:  # updated rows replace their old vectors
                    self.ann.remove_ids(labels)
                self.ann.add_with_ids(mat, labels)
            else:
                self._add_exact(ids, mat)
            self.watermark = latest if self.watermark is None or latest > self.watermark else self.watermark

    def _rebuild(self, count: int) -> None:
        self._reset()
        if count > Settings().integer("EMBEDDECK_SEARCH_EXACT_ROWS"):
            self._train_ann(count)
        self._load(None)

    def refresh(self) -> bool:
        """Bring the index up to date with the table; False (and nothing held) when it is over the cap."""
        now = time.monotonic()
        if self.watermark is not None and now - self.counted_at < self.count_every_s \
                and self._latest() == self.watermark:
            return True
        count, latest = self._state()
        self.counted_at = now
        exact_wanted = count <= Settings().integer("EMBEDDECK_SEARCH_EXACT_ROWS")
        if count > cache_limit_rows(self.dim, not exact_wanted, not db.is_integer_type(self.target.c.source_id.type)):
            self._reset()
            return False
        if count == self.count and latest == self.watermark:
            return True
        if count < self.size or exact_wanted != (self.ann is None) or self.watermark is None:
            self._rebuild(count)  # first load, rows deleted, or the target crossed the exact/approximate line
        else:
            self._load(self.watermark)
        if self.size != count:
            # A row committed late with an older timestamp slipped past the watermark: reload.
            self._rebuild(count)
        self.count = count
        return True

    def top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Best k (scores, ids), or None when the target is too large to hold: stream it instead."""
        with self.lock:
            if not self.refresh():
                return None
            q = (query / (np.linalg.norm(query) or 1.0)).astype(np.float32)
            if self.ann is not None:
                scores, labels = self.ann.search(q[None, :], k)
                keep = labels[0] >= 0
                found = labels[0][keep]
                return scores[0][keep], key_array([self.keys[i] for i in found]) if self.keys else found
            return top_k(self.matrix @ q, self.ids, k)


# Indexes held in this process, least recently used first; together they stay within the cache budget
# (one target once could hold 1 GiB, and every target searched kept its own).
_INDEXES: OrderedDict[tuple[str, str], VectorIndex] = OrderedDict()
_INDEXES_LOCK = threading.Lock()


# A text or UUID key held for the approximate index's labels: the key itself, its dictionary entry and list slot
# (143-197 bytes measured for 36-character text and for UUIDs): half again what an 8-bit 384-d vector takes.
KEY_BYTES = 200


def cache_limit_rows(dim: int, approximate: bool = False, labelled: bool = False) -> int:
    """How many vectors of this size the in-memory index may hold (float32 exact, or 8-bit approximate, with
    the keys where they are not integers)."""
    per_row = dim + 8 + (KEY_BYTES if labelled else 0) if approximate else dim * 4 + 8
    return int(Settings().number("EMBEDDECK_SEARCH_CACHE_MB") * 2**20 // per_row)


def index_for(db_url: str, engine: sa.Engine, target: sa.Table, dim: int) -> VectorIndex:
    """The process's index of a target, made on first use."""
    key = (db_url, str(target))
    with _INDEXES_LOCK:
        if key not in _INDEXES or _INDEXES[key].dim != dim:
            _INDEXES[key] = VectorIndex(engine, target, dim)
        _INDEXES.move_to_end(key)
        return _INDEXES[key]


def trim_indexes() -> None:
    """Drop the least recently used indexes until all of them fit the cache budget together."""
    budget = Settings().number("EMBEDDECK_SEARCH_CACHE_MB") * 2**20
    with _INDEXES_LOCK:
        while len(_INDEXES) > 1 and sum(ix.nbytes for ix in _INDEXES.values()) > budget:
            _INDEXES.popitem(last=False)


def mssql_search_statement(target: sa.Table, dim: int, k: int) -> sa.TextClause:
    """SQL Server 2025 pushdown: the database ranks by VECTOR_DISTANCE itself."""
    from sqlalchemy.dialects import mssql

    prep = mssql.dialect().identifier_preparer
    return sa.text(
        f"SELECT TOP ({int(k)}) {prep.quote('source_id')} AS source_id, "
        f"VECTOR_DISTANCE('cosine', {prep.quote('embedding')}, CAST(:query AS VECTOR({int(dim)}))) AS distance "
        f"FROM {prep.format_table(target)} ORDER BY distance"
    )


def fetch_texts(engine: sa.Engine, origin: dict | None, ids: list) -> dict:
    """Source text of the given ids as runs embed it (normalised, cut, bytes decoded), when the target's source
    is known: k hits of 1 MB documents must not make a 1 GB answer."""
    if not origin or not ids:
        return {}
    source = db.reflect(engine, origin["source"], "source")
    id_col, text_col = (db.column(source, origin[role + "_column"], role) for role in ("id", "text"))
    return db.texts(engine, source, id_col, text_col, ids=ids)


def query_encoder(identity: str):
    """The encoder a target's model column names: `model`, or `model@endpoint` for a remote one."""
    model, _, endpoint_name = identity.partition("@")
    if not endpoint_name:
        return get_encoder(model)
    endpoint = endpoints.resolve(endpoint_name)
    return get_encoder(model, endpoint=endpoint.url, api_key=endpoint.api_key, name=endpoint.name)


def timings_line(result: SearchResult) -> str:
    """The latency parts an operator reads, the model's load only where this query paid it."""
    load = f"model loaded in {result.load_ms:,.0f} ms · " if result.load_ms else ""
    return f"{load}query encoding {result.encode_ms:.0f} ms · search {result.search_ms:.0f} ms"


def search(db_url: str, target_name: str, query: str, k: int = 10, model: str | None = None,
           check_model: Callable[[str], None] | None = None) -> SearchResult:
    """Embed query with the target's model and return the k most similar rows with their text; check_model,
    where given, may refuse a local model before it is loaded (a door's policy)."""
    if not query or not query.strip():
        raise BadRequest("query text is empty")
    if not 1 <= k <= 1000:
        raise BadRequest(f"k must be between 1 and 1000, not {k}")
    engine = db.check_connection(db_url)
    target = db.reflect(engine, target_name, "target")
    db.check_target(target, engine)
    stored = db.target_models(engine, target)
    origin = db.target_origin(engine, db.qualified_name(target))  # as runs record it
    stored_model = (stored[0] if len(stored) == 1 else (origin or {}).get("model")) or "all-MiniLM-L6-v2"
    use_model = absolute_model(model) if model else stored_model
    warnings = []
    if stored and use_model not in stored:
        warnings.append(f"query model {use_model} differs from the stored vectors' model "
                        f"{', '.join(stored)}: scores are not meaningful")
    elif len(stored) > 1:
        warnings.append(f"target holds vectors of several models ({', '.join(stored)})")
    if check_model is not None and "@" not in use_model:  # a remote one is a configured endpoint already
        check_model(use_model)
    t0 = time.perf_counter()
    # Timed apart: the dashboard's first query read "query encoding 1329 ms", of which the model's load was most.
    encoder = query_encoder(use_model)
    loaded = time.perf_counter()
    qvec = encoder.encode([query])[0]
    t1 = time.perf_counter()
    if engine.dialect.name == "mssql" and isinstance(target.c.embedding.type, db.MSSQLVector):
        with engine.connect() as conn:
            rows = conn.execute(mssql_search_statement(target, len(qvec), k),
                                {"query": vectors.to_json(qvec)}).all()
        scores = np.array([1.0 - r.distance for r in rows], dtype=np.float32)
        ids = key_array([r.source_id for r in rows])
    else:
        best = index_for(db_url, engine, target, len(qvec)).top_k(qvec, k)
        trim_indexes()
        scores, ids = best if best is not None else scan_top_k(engine, target, qvec, k)
    t2 = time.perf_counter()
    keys = ids.tolist()  # numpy's integers become Python's
    try:
        texts = fetch_texts(engine, origin, keys)
    except BadRequest as exc:  # the source was dropped or altered since: the vectors still answer
        texts = {}
        warnings.append(f"hits come without text: {exc}")
    hits = [Hit(shown_id(key), float(s), texts.get(key)) for s, key in zip(scores, keys)]
    # The load is what this query waited for a model that became ready during it; a cached one's lookup is not
    # a load (it read 1.1 ms on a busy machine, and the dashboard said "model loaded in 1 ms").
    load_ms = (loaded - t0) * 1000 if encoder.ready_at >= t0 else 0.0
    return SearchResult(hits, use_model, stored, (t1 - loaded) * 1000, (t2 - t1) * 1000, warnings, load_ms)
