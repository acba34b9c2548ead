"""Errors by kind. Each door translates the kind once: an HTTP status, a CLI exit code, an st.error."""

from __future__ import annotations


class EmbedDeckError(Exception):
    """Base of every error EmbedDeck raises on purpose; the message names the problem, never a secret."""

    kind = "internal"


class BadRequest(EmbedDeckError, ValueError):
    """The caller asked for something that cannot run: a wrong table, column, model or setting."""

    kind = "bad_request"


class NotFound(EmbedDeckError):
    """The thing named (a run, a connection) does not exist."""

    kind = "not_found"


class Unavailable(EmbedDeckError):
    """Something EmbedDeck depends on (a database, a Spark master, a remote endpoint) does not answer;
    trying again later may work."""

    kind = "unavailable"


class Conflict(EmbedDeckError):
    """The request clashes with the current state (a run already active on the same target)."""

    kind = "conflict"


def from_kind(kind: str, message: str) -> EmbedDeckError:
    """The error of this kind, rebuilt where it crossed a process boundary as data (a Spark task's result)."""
    kinds = {cls.kind: cls for cls in (BadRequest, NotFound, Unavailable, Conflict)}
    return kinds.get(kind, EmbedDeckError)(message)
