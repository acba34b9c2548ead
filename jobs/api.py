"""Trigger-mode HTTP API (FastAPI): runs, OpenAI/Ollama-style embeddings, health.

Every route but /healthz needs the bearer token (or an `api-key` header, as SQL Server 2025's
CREATE EXTERNAL MODEL sends it). Errors share one shape: {"error": {"code", "message"}}.
"""

from __future__ import annotations

import base64
import hmac
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from jobs import connections, db, launcher
from jobs.encoder import get_encoder, model_dim, model_path
from jobs.errors import BadRequest, EmbedDeckError
from jobs.runs import Registry
from jobs.spec import DEFAULT_MODEL, RunSpec
from jobs.texts import normalize_text

log = logging.getLogger("embeddeck.api")

MAX_INPUTS = 2048
MAX_INPUT_CHARS = 2_000_000
# Whose fault it is: the caller's (4xx) or a dependency's that may come back (503, try again later).
STATUS_OF_KIND = {"bad_request": 400, "not_found": 404, "conflict": 409, "unavailable": 503}
RETRY_AFTER_S = 10


class ApiError(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ApiError


class RunRequest(BaseModel):
    """A RunSpec over HTTP; the database is a configured connection's name, never a URL with a password."""

    model_config = ConfigDict(extra="forbid")
    connection: str | None = Field(None, description="configured connection name; default: the default database")
    source: str = Field(min_length=1, max_length=400)
    id_column: str = Field(min_length=1, max_length=400)
    text_column: str = Field(min_length=1, max_length=400)
    target: str = Field(min_length=1, max_length=400)
    model: str = Field(DEFAULT_MODEL, min_length=1, max_length=400)
    batch_size: int = Field(32, ge=1, le=4096)
    partitions: int | None = Field(None, ge=1, le=10_000)
    mode: Literal["incremental", "full"] = "incremental"
    master: str | None = Field(None, max_length=200)
    limit_rows: int | None = Field(None, ge=1)
    endpoint: str | None = Field(None, max_length=2000, description="OpenAI-compatible embeddings URL")


class RunAccepted(BaseModel):
    run_id: str
    state: str
    status_url: str


# OpenAI also takes token ids (a list of ints, or a list of such lists), as LangChain sends them by
# default; the route accepts that shape only to answer with a 400 that says to send text.
TextOrTokens = str | list[str] | list[int] | list[list[int]]


class EmbeddingsRequest(BaseModel):
    model: str = Field(DEFAULT_MODEL, max_length=400)
    input: TextOrTokens
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: each vector's float32 little-endian bytes, as the openai client asks by default")
    user: str | None = None
    dimensions: int | None = Field(None, description="accepted when it equals the model's own dimension")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class OllamaEmbedRequest(BaseModel):
    model: str = Field(DEFAULT_MODEL, max_length=400)
    input: str | list[str]


class OllamaEmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]


class TeiEmbedRequest(BaseModel):
    """Hugging Face Text Embeddings Inference's /embed body."""

    inputs: str | list[str]
    normalize: bool = True
    truncate: bool = Field(True, description="inputs are always cut at the model's token limit, as TEI with "
                                             "--auto-truncate does")


def load_token() -> str | None:
    """$EMBEDDECK_API_TOKEN, else the contents of the file named by $EMBEDDECK_API_TOKEN_FILE."""
    token = os.environ.get("EMBEDDECK_API_TOKEN", "").strip()
    if not token and os.environ.get("EMBEDDECK_API_TOKEN_FILE"):
        token = Path(os.environ["EMBEDDECK_API_TOKEN_FILE"]).read_text().strip()
    return token or None


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


def create_app(token: str, registry: Registry | None = None) -> FastAPI:
    """The API; `token` is required on every route except /healthz."""
    app = FastAPI(title="EmbedDeck API", version="1.0",
                  responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}})
    registry = registry or Registry()
    encoder_lock = threading.Lock()

    def require_token(authorization: str | None = Header(None), api_key: str | None = Header(None)) -> None:
        given = api_key or ""
        if authorization and authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token")

    # Starlette's own HTTPException (unparseable body, unknown route) must get our shape too.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
                 400: "bad_request"}
        return error(exc.status_code, codes.get(exc.status_code, "error"), str(exc.detail))

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

    def resolve(name: str | None) -> str:
        conns = connections.configured()
        if name is None:
            return db.default_db_url()
        if name not in conns:
            raise BadRequest(f"connection {name!r} is not configured (known: {', '.join(conns)})")
        return conns[name]

    def start(spec: RunSpec) -> RunAccepted:
        run_id = launcher.launch(spec, registry)
        return RunAccepted(run_id=run_id, state="queued", status_url=f"/runs/{run_id}")

    @app.get("/healthz")
    def healthz() -> dict:
        """Database and Spark master reachability; no token needed."""
        out = {"database": "ok", "master": "ok"}
        try:
            db.check_connection(db.default_db_url())
        except EmbedDeckError as exc:
            out["database"] = str(exc)
        master = os.environ.get("EMBEDDECK_SPARK_MASTER", "local[*]")
        try:
            launcher.check_master(master)
        except EmbedDeckError as exc:
            out["master"] = str(exc)
        out["status"] = "ok" if out["database"] == out["master"] == "ok" else "degraded"
        return out

    @app.post("/runs", status_code=202, response_model=RunAccepted, dependencies=[Depends(require_token)],
              responses={400: {"model": ErrorBody}})
    def post_run(req: RunRequest) -> RunAccepted:
        """Validate and start a run; returns at once with its id."""
        spec = RunSpec(db_url=resolve(req.connection), source=req.source, id_column=req.id_column,
                       text_column=req.text_column, target=req.target, model=req.model, batch_size=req.batch_size,
                       partitions=req.partitions, mode=req.mode,
                       master=req.master or os.environ.get("EMBEDDECK_SPARK_MASTER", "local[*]"),
                       limit_rows=req.limit_rows, endpoint=req.endpoint, launched_by="api")
        return start(spec)

    @app.get("/runs", dependencies=[Depends(require_token)])
    def list_runs(limit: int = Query(100, ge=1, le=1000)) -> list[dict]:
        registry.reconcile()
        return [r.as_dict() for r in registry.list(limit)]

    @app.get("/runs/{run_id}", dependencies=[Depends(require_token)], responses={404: {"model": ErrorBody}})
    def get_run(run_id: str) -> dict:
        registry.reconcile()
        run = registry.get(run_id)
        if run is None:
            raise HTTPException(404, f"run {run_id} does not exist")
        return run.as_dict()

    @app.post("/runs/{run_id}/cancel", dependencies=[Depends(require_token)],
              responses={404: {"model": ErrorBody}})
    def cancel_run(run_id: str) -> dict:
        if registry.get(run_id) is None:
            raise HTTPException(404, f"run {run_id} does not exist")
        return {"run_id": run_id, "state": launcher.cancel(run_id, registry)}

    @app.get("/", status_code=202, response_model=RunAccepted, dependencies=[Depends(require_token)],
             responses={400: {"model": ErrorBody}})
    def classic_trigger(model: str = Query(DEFAULT_MODEL, min_length=1, max_length=400),
                        rows: int | None = Query(None, ge=1), workers: int | None = Query(None, ge=0, le=64)):
        """Compatibility trigger: a run on the configured default source and target, answered at once."""
        env = os.environ
        spec = RunSpec(db_url=db.default_db_url(), source=env.get("EMBEDDECK_DEFAULT_SOURCE", "products"),
                       id_column=env.get("EMBEDDECK_DEFAULT_ID_COLUMN", "id"),
                       text_column=env.get("EMBEDDECK_DEFAULT_TEXT_COLUMN", "description"),
                       target=env.get("EMBEDDECK_DEFAULT_TARGET", "product_embeddings"), model=model,
                       master=env.get("EMBEDDECK_SPARK_MASTER", "local[*]"), limit_rows=rows, launched_by="api")
        launcher.validate(spec)
        if workers is not None and spec.master.startswith("spark://"):
            from cluster.controller import Controller

            Controller().scale_manually(workers)
        return start(spec)

    @app.get("/autoscale", dependencies=[Depends(require_token)])
    def autoscale() -> dict:
        """The autoscaler's desired worker count, read by the workers' KEDA metrics-api scale rule."""
        from cluster.autoscale import decide
        from cluster.controller import backlog_inputs, load_settings
        from cluster.telemetry import read_all, store_dir

        current = sum(1 for r in read_all(store_dir()) if not r.stale)
        decision = decide(backlog_inputs(registry, load_settings(), current))
        return {"desired": decision.desired, "current": current, "reason": decision.reason}

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
        model_path(model)  # BadRequest (400) for an unknown model
        with encoder_lock:  # one model instance, one batch at a time
            enc = get_encoder(model)
            prepared = [normalize_text(t) or "" for t in texts]
            vecs = enc.encode(prepared, normalize=normalize)
            tokens = enc.count_tokens(prepared)
        return vecs, tokens

    @app.post("/v1/embeddings", response_model=EmbeddingsResponse, dependencies=[Depends(require_token)],
              responses={400: {"model": ErrorBody}, 413: {"model": ErrorBody}})
    def embeddings(req: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI wire format (NIM, SQL Server 2025 CREATE EXTERNAL MODEL, the openai client)."""
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

    @app.post("/api/embed", response_model=OllamaEmbedResponse, dependencies=[Depends(require_token)],
              responses={400: {"model": ErrorBody}, 413: {"model": ErrorBody}})
    def ollama_embed(req: OllamaEmbedRequest) -> OllamaEmbedResponse:
        """Ollama's embed shape."""
        vecs, _ = encode(req.model, req.input)
        return OllamaEmbedResponse(model=req.model, embeddings=vecs.tolist())

    @app.post("/embed", response_model=list[list[float]], dependencies=[Depends(require_token)],
              responses={400: {"model": ErrorBody}, 413: {"model": ErrorBody}})
    def tei_embed(req: TeiEmbedRequest) -> list[list[float]]:
        """Hugging Face TEI's shape, with the server's default model: one vector per input."""
        vecs, _ = encode(DEFAULT_MODEL, req.inputs, normalize=req.normalize)
        return vecs.tolist()

    return app


def serve(host: str = "127.0.0.1", port: int = 8888) -> int:
    """Run the API with uvicorn; refuses to start without a token rather than run open."""
    import uvicorn

    token = load_token()
    if not token:
        print("error: set EMBEDDECK_API_TOKEN or EMBEDDECK_API_TOKEN_FILE; the API never runs without a token",
              file=sys.stderr)
        return 2
    uvicorn.run(create_app(token), host=host, port=port, log_level="info")
    return 0

