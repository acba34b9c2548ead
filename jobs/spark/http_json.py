"""GET a Spark web UI's JSON (a master's /json/, an application's REST API); never raises into its caller."""

from __future__ import annotations

from dataclasses import dataclass

import requests

TIMEOUT_S = 2.0


@dataclass
class Reply:
    """A JSON answer, or why there is none ("unreachable: …")."""

    ok: bool
    data: object = None
    error: str | None = None


def get_json(url: str, timeout: float = TIMEOUT_S) -> Reply:
    """GET url as JSON; connection problems and timeouts become Reply(ok=False)."""
    try:
        resp = requests.get(url, timeout=timeout)
        resp.raise_for_status()
        return Reply(True, resp.json())
    except requests.RequestException as exc:
        return Reply(False, error=f"unreachable: {type(exc).__name__}: {str(exc)[:200]}")
    except ValueError as exc:
        return Reply(False, error=f"not JSON: {exc}")


def master_json(webui: str, timeout: float = TIMEOUT_S) -> Reply:
    """A standalone master's /json/ from its web UI address (http://127.0.0.1:8080)."""
    return get_json(webui.rstrip("/") + "/json/", timeout)
