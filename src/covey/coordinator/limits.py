"""Guards in front of every route, as plain ASGI middleware (no buffering, no per-chunk cost
on responses, unlike Starlette's ``BaseHTTPMiddleware``): a cap on request body size, and
no API key in a URL."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from covey.protocol.errors import ApiError
from covey.protocol.requests import MAX_BODY_BYTES, too_large

__all__ = ["MAX_BODY_BYTES", "BodyLimit", "QueryKeyGuard"]


class BodyLimit:
    """Refuse HTTP bodies over ``max_bytes`` with 413 in OpenAI's error shape; ``paths``
    gives other caps for some paths (an upload route's)."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES,
                 paths: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}

    async def _send_error(self, send: Any, limit: int) -> None:
        err = too_large(limit)
        body = json.dumps(err.body().model_dump()).encode()
        await send({"type": "http.response.start", "status": err.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.paths.get(scope.get("path", ""), self.max_bytes)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._send_error(send, limit)
            return
        seen = 0
        too_large = False

        async def limited_receive() -> dict[str, Any]:
            # A chunked body has no length up front: stop reading at the cap and hand the
            # app an empty end of body; its answer is then replaced by the 413 below.
            nonlocal seen, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._send_error(send, limit)

        await self.app(scope, limited_receive, guarded_send)


QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "api-key", "key", "access_token", "token",
                             "authorization", "bearer"})
"""Query parameters that would carry an API key (the names other APIs take keys under)."""


class QueryKeyGuard:
    """Refuse a request whose URL carries an API key (a parameter named as in
    :data:`QUERY_KEY_NAMES`, or any value shaped like a Covey key): 401 in OpenAI's error
    shape saying where keys go, or close code 4401 for a WebSocket. URLs reach access logs,
    proxies and browser history; a key there must be treated as leaked, not used."""

    def __init__(self, app: Any) -> None:
        self.app = app

    @staticmethod
    def _carries_key(query: bytes) -> bool:
        if not query:  # the common case: no parsing
            return False
        # ';' separates parameters too for some servers and proxies: a key after one counts.
        text = query.decode("latin-1").replace(";", "&")
        for name, value in parse_qsl(text, keep_blank_values=True):
            if name.lower() in QUERY_KEY_NAMES or "sk-covey-" in value or "sk-covey-" in name:
                return True
        return False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") \
                or not self._carries_key(scope.get("query_string") or b""):
            await self.app(scope, receive, send)
            return
        message = ("API keys go in the 'Authorization: Bearer <key>' header, never in the "
                   "URL, where logs and proxies keep it. If you sent a real key this way, "
                   "revoke it and make another.")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401, "reason": message[:120]})
            return
        err = ApiError(401, message, code="api_key_in_url", type="invalid_request_error")
        body = json.dumps(err.body().model_dump()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
