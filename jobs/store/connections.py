"""Configured database connections: the embedded demo, $EMBEDDECK_DB_URL, and .streamlit/secrets.toml."""

from __future__ import annotations

from collections.abc import Mapping

from jobs.core.settings import Settings
from jobs.store.db import redact_url

EMBEDDED = "embedded demo (SQLite)"


def configured(secrets: Mapping | None = None) -> dict[str, str]:
    """Connection name → URL: the embedded demo, $EMBEDDECK_DB_URL, and [connections.NAME] url = "…" in the
    secrets file (or in `secrets`, when given)."""
    settings = Settings()
    out = {EMBEDDED: f"sqlite:///{settings.home / 'embeddeck.sqlite'}"}
    if settings.raw("EMBEDDECK_DB_URL"):
        out["environment ($EMBEDDECK_DB_URL)"] = settings.db_url
    tables = settings.secrets() if secrets is None else secrets
    for name, entry in dict(tables.get("connections", {}) or {}).items():
        url = entry.get("url") if isinstance(entry, Mapping) else None
        if url:
            out[str(name)] = str(url)
    return out


def label(name: str, url: str) -> str:
    """What the UI shows: the name and the URL without its password."""
    return f"{name} — {redact_url(url)}"


def resolve(redacted: str, connections: dict[str, str]) -> str | None:
    """The real URL of a configured connection whose redacted form is `redacted` (for reruns)."""
    for url in connections.values():
        if redact_url(url) == redacted or url == redacted:
            return url
    return None
