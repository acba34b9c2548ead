"""The HTTP API's request and response bodies (pydantic), as its OpenAPI schema shows them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from jobs.core.spec import DEFAULT_BATCH_SIZE, DEFAULT_MODEL
from jobs.core.texts import MAX_TEXT_CHARS


class ApiError(BaseModel):
    # The codes of the README's table, each telling whose fault a failure is; the schema lists them.
    code: Literal["bad_request", "unauthorized", "not_found", "method_not_allowed", "conflict", "too_large",
                  "invalid_request", "unavailable", "internal"]
    message: str


class ErrorBody(BaseModel):
    error: ApiError


class RunRequest(BaseModel):
    """A RunSpec over HTTP. The database and a remote endpoint are names the server has configured, never URLs,
    and the Spark master is the server's own: a caller cannot point the server anywhere."""

    model_config = ConfigDict(extra="forbid")
    connection: str | None = Field(None, description="configured connection name; default: the default database")
    source: str = Field(min_length=1, max_length=400, description="a table or view; `schema.name` outside the "
                                                                "default schema")
    id_column: str = Field(min_length=1, max_length=400, description="the source's key: an integer, text or UUID "
                                                                     "column")
    text_column: str = Field(min_length=1, max_length=400)
    target: str = Field(min_length=1, max_length=400)
    model: str = Field(DEFAULT_MODEL, min_length=1, max_length=400)
    # Ranges and choices are RunSpec's to check (one place, a 400 naming the field), not repeated here.
    batch_size: int = DEFAULT_BATCH_SIZE
    partitions: int | None = None
    mode: str = "incremental"
    limit_rows: int | None = None
    endpoint: str | None = Field(None, max_length=200, description="a configured remote endpoint's name; "
                                                                   "URLs are never accepted")


class SearchRequest(BaseModel):
    """Top-k over a target's stored vectors; the database is a configured name, as for runs."""

    model_config = ConfigDict(extra="forbid")
    connection: str | None = Field(None, description="configured connection name; default: the default database")
    target: str = Field(min_length=1, max_length=400)
    query: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    k: int = Field(10, description="1 to 1000")  # search's to check, with a 400 naming it
    model: str | None = Field(None, max_length=400, description="the query's model; default: the stored vectors'")


class SearchHit(BaseModel):
    id: int | str = Field(description="the source row's id: a number, or text (text and UUID keys)")
    score: float
    text: str | None = Field(description="the source text as runs embed it (normalised, at most 65,536 characters)")


class SearchResponse(BaseModel):
    model: str
    stored_models: list[str]
    hits: list[SearchHit]
    encode_ms: float
    search_ms: float
    warnings: list[str]
    load_ms: float = Field(description="loading the model, which the server's first query with it pays; 0 after")


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
