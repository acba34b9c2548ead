"""Text normalisation and content hashing: what the model sees and how changes are detected."""

from __future__ import annotations

import hashlib
import re

# The model sees at most 256 tokens; cutting the raw text first bounds tokenizer time and
# memory for pathological rows (a 1 MB text) without changing the tokens the model keeps.
MAX_TEXT_CHARS = 65_536


def normalize_text(value: object) -> str | None:
    """The text to embed, or None when there is nothing to embed (NULL, empty, blank)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = str(value)
    value = value.replace("\x00", " ")
    if not value.strip():
        return None
    return value[:MAX_TEXT_CHARS]


# C0 and C1 controls and DEL: line breaks, tabs, and the ESC or CSI that starts a terminal's escape sequences.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(text: str, limit: int) -> str:
    """text as one line of a terminal listing: control characters and runs of whitespace as one space, cut to limit
    characters. A text's own ESC [2J would clear the terminal, and its line breaks split a listing's rows."""
    return " ".join(_CONTROLS.sub(" ", text).split())[:limit]


def content_hash(text: str) -> str:
    """SHA-256 hex of the normalised text, stored beside the vector to detect changed rows."""
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
