"""Trigger-mode HTTP API (FastAPI): runs, search, OpenAI/Ollama/TEI-style embeddings, the autoscale metric,
health.

Every route but /healthz needs the bearer token (or an `api-key` header, as SQL Server 2025's
CREATE EXTERNAL MODEL sends it). Errors share one shape, {"error": {"code", "message"}}, and EmbedDeck's
error kinds map to statuses here, once.
"""

from __future__ import annotations

import base64
import logging
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import lifecycle
from jobs.core.errors import BadRequest, EmbedDeckError
from jobs.core.processes import port_taken
from jobs.core.settings import Settings
from jobs.core.spec import DEFAULT_MODEL, RunSpec
from jobs.core.texts import normalize_text
from jobs.doors.api_guard import RequestGuard
from jobs.doors.api_models import (
    EmbeddingItem,
    EmbeddingsRequest,
    EmbeddingsResponse,
    ErrorBody,
    OllamaEmbedRequest,
    OllamaEmbedResponse,
    RunAccepted,
    RunRequest,
    SearchHit,
    SearchRequest,
    SearchResponse,
    TeiEmbedRequest,
    TextOrTokens,
    Usage,
)
from jobs.embed import search
from jobs.embed.encoder import get_encoder, model_dim, model_path
from jobs.store import connections, endpoints, scaling, worker_readings
from jobs.store.registry import Registry

log = logging.getLogger("embeddeck.api")

MAX_INPUTS = 2048
MAX_INPUT_CHARS = 2_000_000
ENCODE_SLICE = 64  # inputs encoded per turn at the model
# Whose fault it is: the caller's (4xx) or a dependency's that may come back (503, try again later).
STATUS_OF_KIND = {"bad_request": 400, "not_found": 404, "conflict": 409, "unavailable": 503}
RETRY_AFTER_S = 10
HEALTH_TTL_S, HEALTH_TIMEOUT_S = 5.0, 2.0
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "too_large", 422: "invalid_request"}
BAD = {400: {"model": ErrorBody}, 413: {"model": ErrorBody}}


def load_token() -> str | None:
    """$EMBEDDECK_API_TOKEN, else the contents of the file named by $EMBEDDECK_API_TOKEN_FILE."""
    settings = Settings()
    token = (settings.raw("EMBEDDECK_API_TOKEN") or "").strip()
    token_file = settings.raw("EMBEDDECK_API_TOKEN_FILE")
    if not token and token_file:
        token = Path(token_file).read_text().strip()
    return token or None


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


def check_model_allowed(model: str) -> None:
    """The server runs only the models it is configured to ($EMBEDDECK_ALLOWED_MODELS): a caller cannot make
    it load any directory it can name."""
    allowed = [m.strip() for m in (Settings().raw("EMBEDDECK_ALLOWED_MODELS") or "").split(",") if m.strip()]
    if model in allowed or model_path(model) in {model_path(m) for m in allowed}:
        return
    raise BadRequest(f"model {model!r} is not served here (allowed: {', '.join(allowed)})")


def install_error_handlers(app: FastAPI) -> None:
    """Every failure answers in the one error shape; EmbedDeck's kinds become statuses here."""

    # Starlette's own HTTPException (unparseable body, unknown route) must get our shape too.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        fallback = "bad_request" if exc.status_code < 500 else "internal"
        return error(exc.status_code, HTTP_CODES.get(exc.status_code, fallback), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", []))
        return error(422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(EmbedDeckError)
    async def embeddeck_error(_: Request, exc: EmbedDeckError):
        status = STATUS_OF_KIND.get(exc.kind, 500)
        response = error(status, exc.kind, str(exc))
        if status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
        return response

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception):
        log.exception("internal error")
        return error(500, "internal", f"internal error ({type(exc).__name__})")


class HealthCache:
    """/healthz answers from a result at most HEALTH_TTL_S old, and one check runs at a time: the route is
    open to anyone, so callers must never make it a database round trip each (80 calls against a stalled
    database once held an authenticated request for 19 s)."""

    def __init__(self, ttl_s: float = HEALTH_TTL_S):
        self.ttl_s, self.lock = ttl_s, threading.Lock()
        self.checked_at, self.checks = -float("inf"), {"database": False, "master": False}  # not known yet

    def get(self) -> dict:
        stale = time.monotonic() - self.checked_at > self.ttl_s
        if stale and self.lock.acquire(blocking=False):
            try:  # the others answer from the last result meanwhile
                self.checks = {name: answer == "ok" for name, answer in lifecycle.health(HEALTH_TIMEOUT_S).items()}
                self.checked_at = time.monotonic()
            finally:
                self.lock.release()
        checks = dict(self.checks)
        return {"status": "ok" if all(checks.values()) else "degraded", "checks": checks}


def health_router() -> APIRouter:
    router = APIRouter()
    cache = HealthCache()

    @router.get("/healthz")
    def healthz() -> dict:
        """Whether the database and the Spark master answer; no token needed, and so nothing but booleans:
        no host, user or message."""
        return cache.get()

    return router


def db_url_for(connection: str | None) -> str:
    """The database a request names: a configured connection, else the default one; never a URL from the caller."""
    if connection is None:
        return Settings().db_url
    configured = connections.configured()
    if connection not in configured:
        raise BadRequest(f"connection {connection!r} is not configured (known: {', '.join(configured)})")
    return configured[connection]


def runs_router(registry: Registry) -> APIRouter:
    """Start, follow and cancel runs through the lifecycle."""
    router = APIRouter()

    def accepted(run_id: str) -> RunAccepted:
        return RunAccepted(run_id=run_id, state="queued", status_url=f"/runs/{run_id}")

    @router.post("/runs", status_code=202, response_model=RunAccepted, responses={400: {"model": ErrorBody}})
    def post_run(req: RunRequest) -> RunAccepted:
        """Validate and start a run; returns at once with its id."""
        db_url = db_url_for(req.connection)
        if req.endpoint is not None:
            endpoints.resolve(req.endpoint, allow_url=False)
        else:
            check_model_allowed(req.model)
        spec = RunSpec(db_url=db_url, source=req.source, id_column=req.id_column, text_column=req.text_column,
                       target=req.target, model=req.model, batch_size=req.batch_size, partitions=req.partitions,
                       mode=req.mode, master=lifecycle.resolve_master(), limit_rows=req.limit_rows,
                       endpoint=req.endpoint, launched_by="api")
        return accepted(lifecycle.launch(spec, registry))

    @router.get("/runs")
    def list_runs(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        lifecycle.refresh(registry)
        return [r.as_dict() for r in registry.list(limit)]

    @router.get("/runs/{run_id}", responses={404: {"model": ErrorBody}})
    def get_run(run_id: str) -> dict:
        return lifecycle.get(run_id, registry).as_dict()

    @router.post("/runs/{run_id}/cancel", responses={404: {"model": ErrorBody}})
    def cancel_run(run_id: str) -> dict:
        """Cancel and answer the final state (the driver stops within seconds)."""
        return {"run_id": run_id, "state": lifecycle.cancel_and_wait(run_id, registry)}

    @router.get("/", status_code=202, response_model=RunAccepted, responses={400: {"model": ErrorBody}})
    def classic_trigger(model: str = Query(DEFAULT_MODEL, min_length=1, max_length=400),
                        rows: int | None = Query(None, ge=1), workers: int | None = Query(None, ge=0, le=64)):
        """Compatibility trigger: a run on the configured default source and target, answered at once;
        `workers` is the operator's manual worker count (autoscale off), as the cluster page sets it."""
        check_model_allowed(model)
        settings = Settings()
        if workers is not None:
            scaling.check_workers(workers)
        spec = RunSpec(db_url=settings.db_url, source=settings.raw("EMBEDDECK_DEFAULT_SOURCE"),
                       id_column=settings.raw("EMBEDDECK_DEFAULT_ID_COLUMN"),
                       text_column=settings.raw("EMBEDDECK_DEFAULT_TEXT_COLUMN"),
                       target=settings.raw("EMBEDDECK_DEFAULT_TARGET"), model=model,
                       master=lifecycle.resolve_master(), limit_rows=rows, launched_by="api")
        spec, _ = lifecycle.validate(spec)
        if workers is not None:
            scaling.set_manual(workers, registry)
        return accepted(lifecycle.record(spec, registry))

    return router


def search_router() -> APIRouter:
    router = APIRouter()

    @router.post("/search", response_model=SearchResponse, responses={400: {"model": ErrorBody}})
    def search_target(req: SearchRequest) -> SearchResponse:
        """Top-k rows of a target most similar to the query: the search the dashboard and the CLI run."""
        result = search.search(db_url_for(req.connection), req.target, req.query, k=req.k, model=req.model,
                               check_model=check_model_allowed)
        return SearchResponse(model=result.model, stored_models=result.stored_models,
                              hits=[SearchHit(id=h.id, score=h.score, text=h.text) for h in result.hits],
                              encode_ms=result.encode_ms, search_ms=result.search_ms, warnings=result.warnings,
                              load_ms=result.load_ms)

    return router


def scaling_router(registry: Registry) -> APIRouter:
    router = APIRouter()

    history = scaling.ScaleHistory(registry)

    @router.get("/autoscale")
    def autoscale() -> dict:
        """The autoscale step's desired worker count, read by the workers' KEDA metrics-api scale rule:
        the same step the local control loop takes, so the operator's manual count reaches Azure too.
        Each poll is recorded as the local loop records its ticks: the Cluster page and run costs read it."""
        lifecycle.refresh(registry)
        current = worker_readings.fresh_count()
        decision = scaling.desired(registry, current)
        if decision.desired != history.last_desired():
            history.record(current, decision.desired, decision.reason, decision.source)
        history.sample(current, decision.desired)
        return {"desired": decision.desired, "current": current, "reason": decision.reason}

    return router


class FairLock:
    """A lock taken in the order it was asked for. threading.Lock is not: a thread that releases it and asks
    again at once (a big request's next slice) wins over one that has been waiting (a small request)."""

    def __init__(self):
        self._cond, self._queue = threading.Condition(), deque()

    def __enter__(self) -> None:
        me = object()
        with self._cond:
            self._queue.append(me)
            self._cond.wait_for(lambda: self._queue[0] is me)

    def __exit__(self, *_) -> None:
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()


def embeddings_router() -> APIRouter:
    """OpenAI, Ollama and TEI embedding routes over one encoder per model in this process."""
    router = APIRouter()
    encoder_lock = FairLock()

    def encode(model: str, inputs: TextOrTokens, normalize: bool = True) -> tuple[np.ndarray, int]:
        """Vectors for one request's inputs and the tokens the model read."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("input must be text (a string or a list of strings); token ids are not accepted, "
                             "EmbedDeck tokenises with the model's own tokenizer")
        if not texts:
            raise HTTPException(422, "input is empty")
        if len(texts) > MAX_INPUTS:
            raise HTTPException(413, f"{len(texts)} inputs; at most {MAX_INPUTS} per request")
        if sum(len(t) for t in texts) > MAX_INPUT_CHARS:
            raise HTTPException(413, f"inputs exceed {MAX_INPUT_CHARS} characters in total")
        check_model_allowed(model)
        prepared = [normalize_text(t) or "" for t in texts]
        with encoder_lock:
            enc = get_encoder(model)
            tokens = enc.count_tokens(prepared)
        parts = []
        # One model instance, one slice at a time: a 2,048-input request takes turns with the others
        # instead of holding the model for its whole length while a one-input request waits.
        for start in range(0, len(prepared), ENCODE_SLICE):
            with encoder_lock:
                parts.append(enc.encode(prepared[start:start + ENCODE_SLICE], normalize=normalize))
        return np.concatenate(parts), tokens

    @router.post("/v1/embeddings", response_model=EmbeddingsResponse, responses=BAD)
    def embeddings(req: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI wire format (NIM, SQL Server 2025 CREATE EXTERNAL MODEL, the openai client)."""
        check_model_allowed(req.model)  # before its files are read for the dimension
        if req.dimensions is not None and req.dimensions != model_dim(req.model):
            raise BadRequest(f"dimensions must be {model_dim(req.model)}, the dimension of {req.model}, "
                             f"not {req.dimensions}: vectors are never shortened")
        vecs, tokens = encode(req.model, req.input)
        if req.encoding_format == "base64":
            data = [EmbeddingItem(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"))
                    for i, v in enumerate(vecs)]
        else:
            data = [EmbeddingItem(index=i, embedding=v) for i, v in enumerate(vecs.tolist())]
        return EmbeddingsResponse(data=data, model=req.model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))

    @router.post("/api/embed", response_model=OllamaEmbedResponse, responses=BAD)
    def ollama_embed(req: OllamaEmbedRequest) -> OllamaEmbedResponse:
        """Ollama's embed shape."""
        vecs, _ = encode(req.model, req.input)
        return OllamaEmbedResponse(model=req.model, embeddings=vecs.tolist())

    @router.post("/embed", response_model=list[list[float]], responses=BAD)
    def tei_embed(req: TeiEmbedRequest) -> list[list[float]]:
        """Hugging Face TEI's shape, with the server's default model: one vector per input."""
        vecs, _ = encode(DEFAULT_MODEL, req.inputs, normalize=req.normalize)
        return vecs.tolist()

    return router


def create_app(token: str, registry: Registry | None = None, autoscale_token: str | None = None) -> FastAPI:
    """The API; `token` is required on every route except /healthz (the schema and /docs included),
    checked with the body's size by RequestGuard before any body is read."""
    app = FastAPI(title="EmbedDeck API", version="1.0",
                  responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}})
    registry = registry or Registry()
    install_error_handlers(app)
    app.include_router(health_router())
    app.include_router(runs_router(registry))
    app.include_router(scaling_router(registry))
    app.include_router(search_router())
    app.include_router(embeddings_router())
    app.add_middleware(RequestGuard, token=token, autoscale_token=autoscale_token)
    return app


def serve(host: str = "127.0.0.1", port: int = 8888) -> int:
    """Run the API with uvicorn; refuses to start without a token rather than run open."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    token = load_token()
    if not token:
        print("error: set EMBEDDECK_API_TOKEN or EMBEDDECK_API_TOKEN_FILE; the API never runs without a token",
              file=sys.stderr)
        return 2
    if port_taken(port, host):
        print(f"error: port {port} is in use on {host} (is the API already running?)", file=sys.stderr)
        return 2
    registry = Registry()
    threading.Thread(target=lifecycle.settle_forever, args=(registry, threading.Event()), daemon=True,
                     name="embeddeck-settle").start()
    # Bounded: connections at once, idle keep-alive, the size of an unfinished header block.
    app = create_app(token, registry, Settings().raw("EMBEDDECK_AUTOSCALE_TOKEN"))
    # uvicorn shuts down gracefully on SIGINT and SIGTERM only; a closed terminal (SIGHUP) is asked the same way,
    # rather than ending it in the middle of its lifespan.
    signal.signal(signal.SIGHUP, lambda *_: signal.raise_signal(signal.SIGTERM))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", limit_concurrency=256, timeout_keep_alive=5,
                    h11_max_incomplete_event_size=64 * 1024)
    except SystemExit as exc:
        if exc.code == STARTUP_FAILURE:  # 3, which the CLI's exit codes give to a cancelled run
            return 2
        raise  # SIGTERM or SIGHUP, raised again by uvicorn once it has shut down
    return 0
