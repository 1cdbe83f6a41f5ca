"""The two completion endpoints' common case, served without FastAPI's per-request work.

A fifth of the coordinator's CPU for a short billed completion was FastAPI's and
Starlette's own: a dozen middleware layers, routing, a ``Request`` object, dependency
solving, body reading through two wrappers. :class:`FastInference`
answers the common case of ``POST /v1/chat/completions`` and ``POST /v1/completions`` (a
JSON body that validates, a key the coordinator saw in the last minute) with the same
models and the same :func:`~covey.coordinator.api.chat.respond`, as one plain ASGI layer.

Anything else goes on to the FastAPI routes unchanged, its body replayed: no key, an
unknown key, another content type, a body that does not parse or validate, or one over the
size cap. Those routes are the endpoints' definition, and every refusal keeps their shape.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

from covey.coordinator.api.chat import Asked, chat_asked, completion_asked, respond
from covey.coordinator.errors import ApiError, error_response
from covey.protocol.openai import ChatCompletionRequest, CompletionRequest
from covey.protocol.requests import MAX_BODY_BYTES

log = logging.getLogger("covey.coordinator")

Receive = Callable[[], Awaitable[dict[str, Any]]]

ROUTES: dict[str, tuple[type[BaseModel], Callable[[Any], Asked]]] = {
    "/v1/chat/completions": (ChatCompletionRequest, chat_asked),
    "/v1/completions": (CompletionRequest, completion_asked),
}
"""Path → (body model, what it asks): the routes served here."""

_JSON = b"application/json"


def _replay(chunks: list[bytes], more: bool, receive: Receive) -> Receive:
    """A receive channel that first gives back the body already read (``chunks``, more
    to come when ``more``), then goes on with ``receive``."""
    first: list[dict[str, Any]] = [{"type": "http.request", "body": b"".join(chunks),
                                    "more_body": more}]

    async def replayed() -> dict[str, Any]:
        if first:
            return first.pop()
        return await receive()
    return replayed


class FastInference:
    """ASGI middleware: serve the common case of the completion endpoints (see the module
    docstring), pass everything else to ``app``. ``state`` is the FastAPI app's state
    (``serving``, ``config``, ``metrics``); ``max_bytes`` the body size cap (bytes)."""

    def __init__(self, app: Any, state: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.state = state
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Any) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        account = self._account(scope["headers"])
        if account is None:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # gone before its body arrived
                return
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:  # the route's guard answers it (413)
                await self.app(scope, _replay(chunks, more, receive), send)
                return
            if not more:
                break
        model, asked = route
        try:  # as FastAPI does it: json.loads, then the model in Python mode
            body = model.model_validate(json.loads(b"".join(chunks)))
        except Exception:  # noqa: BLE001 - any refusal (even a RecursionError) is the route's
            await self.app(scope, _replay(chunks, False, receive), send)
            return
        await self._serve(scope, receive, send, account, lambda: asked(body))

    def _account(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The account of a JSON request's bearer key, when the coordinator knows the key
        without asking the database; None sends the request the long way (so do a repeated
        ``Authorization`` or ``Content-Type`` header and a body declared over the cap)."""
        auth = content_type = None
        for name, value in headers:
            if name == b"authorization":
                if auth is not None:  # which one counts is the route's to say
                    return None
                auth = value
            elif name == b"content-type":
                if content_type is not None:
                    return None
                content_type = value
            elif name == b"content-length" and (not value.isdigit()
                                                or int(value) > self.max_bytes):
                return None  # the route's guard answers it (413) without reading it
        if auth is None or content_type != _JSON or auth[:7].lower() != b"bearer ":
            return None
        key = auth[7:].strip()
        if not key:
            return None
        # Latin-1, as Starlette decodes headers: the same key text the route would look up.
        return self.state.serving.billing.bank.cached_account(key.decode("latin-1"))

    async def _serve(self, scope: dict[str, Any], receive: Receive, send: Any, account: str,
                     asked: Callable[[], Asked]) -> None:
        """Serve the request and send the response; an :class:`ApiError` becomes its
        OpenAI-shaped answer and anything else a 500, as the app's error handlers do."""
        logged = False

        def admitted() -> None:
            nonlocal logged
            logged = True

        try:
            response = await respond(self.state, receive, account, asked(), admitted)
        except ApiError as exc:
            if not logged:  # refused before its record existed: counted as the app does
                self.state.metrics.refused(scope["path"], exc.status, exc.code)
            response = error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the app's 500, in OpenAI's shape
            log.exception("unhandled error", exc_info=exc)
            response = error_response(ApiError(500, "The coordinator hit an internal error.",
                                               code="internal_error"))
        await response(scope, receive, send)
