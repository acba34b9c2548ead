"""Configured remote embedding endpoints (OpenAI-compatible: an NVIDIA NIM, another EmbedDeck), each with
its own key. Callers of the API name one; its key is sent to its own URL and nowhere else."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from jobs.core.errors import BadRequest
from jobs.core.settings import Settings

ENV_NAME = "remote"  # the endpoint EMBEDDECK_REMOTE_ENDPOINT configures


@dataclass(frozen=True)
class Endpoint:
    """A named endpoint: its embeddings URL and key (never shown)."""

    name: str
    url: str
    api_key: str | None = field(default=None, repr=False)


def configured(secrets: Mapping | None = None) -> dict[str, Endpoint]:
    """Name → endpoint: `remote` from the environment, and [endpoints.NAME] url / api_key in the secrets file."""
    settings = Settings()
    out = {}
    if settings.raw("EMBEDDECK_REMOTE_ENDPOINT"):
        out[ENV_NAME] = Endpoint(ENV_NAME, settings.raw("EMBEDDECK_REMOTE_ENDPOINT"),
                                 settings.raw("EMBEDDECK_REMOTE_API_KEY"))
    tables = settings.secrets() if secrets is None else secrets
    for name, entry in dict(tables.get("endpoints", {}) or {}).items():
        if isinstance(entry, Mapping) and entry.get("url"):
            out[str(name)] = Endpoint(str(name), str(entry["url"]), entry.get("api_key"))
    return out


def resolve(name_or_url: str, allow_url: bool = True) -> Endpoint:
    """The configured endpoint of that name (or URL). An operator's own URL (CLI) that matches none is used
    without any key; over the API (allow_url False) only configured names are accepted."""
    endpoints = configured()
    if name_or_url in endpoints:
        return endpoints[name_or_url]
    for endpoint in endpoints.values():
        if endpoint.url.rstrip("/") == name_or_url.rstrip("/"):
            return endpoint
    if allow_url and name_or_url.startswith(("http://", "https://")):
        return Endpoint(name_or_url, name_or_url)
    known = ", ".join(endpoints) or "none"
    raise BadRequest(f"endpoint {name_or_url!r} is not configured (configured endpoints: {known})")
