"""The API's front gate, as ASGI middleware: the token is checked from the headers, and the body's size is
capped, before a single byte of the body is read or parsed. FastAPI parses a JSON body before any route
dependency runs, so a check there lets an anonymous 600 MiB body cost gigabytes first."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = frozenset({"/healthz"})
AUTOSCALE_PATH = "/autoscale"  # the one route KEDA's read-only token opens
MAX_BODY_BYTES = 16 * 2**20  # 2,048 inputs of 2,000,000 characters in all, JSON-escaped, fit well inside


def authorized(headers: dict[str, str], token: str) -> bool:
    """A bearer token or an `api-key` header (as SQL Server 2025's CREATE EXTERNAL MODEL sends it), compared
    in constant time."""
    given = headers.get("api-key", "")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())


class RequestGuard:
    """401 without the token, 413 over max_body bytes (declared or streamed); everything else passes."""

    def __init__(self, app, token: str, autoscale_token: str | None = None, max_body: int = MAX_BODY_BYTES):
        self.app, self.token, self.autoscale_token, self.max_body = app, token, autoscale_token, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        keda = (scope["path"] == AUTOSCALE_PATH and scope["method"] == "GET" and self.autoscale_token
                and authorized(headers, self.autoscale_token))
        if scope["path"] not in OPEN_PATHS and not keda and not authorized(headers, self.token):
            await reject(send, 401, "unauthorized", "missing or wrong bearer token")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await reject(send, 413, "too_large", f"request body over {self.max_body} bytes")
            return
        state = {"received": 0, "over": False, "answered": False}

        async def counted_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body:  # a chunked body that declared no length
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"]:
                return  # the app's answer to the cut-off body is replaced by the 413 below
            state["answered"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["answered"]:
            await reject(send, 413, "too_large", f"request body over {self.max_body} bytes")


async def reject(send, status: int, code: str, message: str) -> None:
    """Answer in the API's one error shape, without reading the request."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
