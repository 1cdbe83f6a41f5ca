"""``covey proxy``: the OpenAI API on 127.0.0.1, every request end-to-end encrypted.

Existing tools change only their ``base_url``. Each chat or completion request is checked
like the coordinator checks it (:mod:`covey.protocol.requests`), then sealed to the miner
the coordinator routes it to (:class:`~covey.client.sealed.SealedChannel`); answers come
back in OpenAI's shapes, streamed or whole. ``GET /v1/models`` is passed through (it holds
no secret). The API key the proxy's own clients send is ignored: the proxy spends the key
it was started with, so bind it to loopback only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from covey.client.sealed import Answer, SealedChannel, TokenCodec
from covey.protocol.errors import ApiError, from_validation_errors
from covey.protocol.frames import Done, Generate
from covey.protocol.openai import ChatCompletionRequest, CompletionRequest
from covey.protocol.openai_stream import (
    SSE_DONE,
    ChatFormatter,
    CompletionFormatter,
    Formatter,
    Meta,
    sse,
    unless_client_leaves,
)
from covey.protocol.requests import MAX_BODY_BYTES, chat_job, completion_job, too_large

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body().model_dump(), status_code=exc.status, headers=exc.headers)


async def _parse(request: Request, model: type[ChatCompletionRequest] | type[CompletionRequest]
                 ) -> Any:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large()
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large()
    if not body:
        raise ApiError(400, "The request has no body; send a JSON object.",
                       code="missing_body")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None


def _done(answer: Answer) -> Done:
    d = answer.done
    assert d is not None
    return Done(job_id=answer.job_id, finish_reason=d.finish_reason,
                prompt_tokens=d.prompt_tokens, completion_tokens=d.completion_tokens)


def _formatter(answer: Answer, model: str, chat: bool) -> Formatter:
    meta = Meta(id=answer.job_id, created=int(time.time()), model=model,
                fingerprint=f"miner-{answer.miner[:16]}")
    return ChatFormatter(meta) if chat else CompletionFormatter(meta)


def create_proxy_app(coordinator: str, api_key: str,
                     private: Mapping[str, TokenCodec] | None = None) -> FastAPI:
    """The proxy's ASGI app for the coordinator at ``coordinator`` (http(s) URL), spending
    ``api_key``; ``private`` maps private models' names to their codecs."""
    channel = SealedChannel(coordinator, api_key, private)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await channel.close()

    app = FastAPI(title="Covey privacy proxy", lifespan=lifespan)
    app.state.channel = channel

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"The privacy proxy serves POST /v1/chat/completions, POST /v1/completions "
                   f"and GET /v1/models; {exc.detail}." if exc.status_code in (404, 405)
                   else str(exc.detail))
        return _error(ApiError(exc.status_code, message, headers=exc.headers))

    async def answer(request: Request, job: Generate, chat: bool, stream: bool,
                     include_usage: bool, check: bool) -> Response:
        # A client that hangs up before the answer (or its first piece) cancels the job,
        # as on the coordinator.
        stayed, response = await unless_client_leaves(
            request.receive, _answer(job, chat, stream, include_usage, check))
        return response if stayed and response is not None else Response(status_code=499)

    async def _answer(job: Generate, chat: bool, stream: bool, include_usage: bool, check: bool
                      ) -> Response:
        state = Answer()
        pieces = channel.stream(job, chat, check, state)
        # The first piece (or the error) comes before any byte is sent, so a refused
        # request gets its real status, as from the coordinator.
        first = await anext(pieces, None)
        fmt = _formatter(state, job.model, chat)
        if not stream:
            parts = [first or ""]
            async for piece in pieces:
                parts.append(piece)
            return JSONResponse(fmt.whole("".join(parts), _done(state)).model_dump(mode="json"))

        async def events() -> AsyncIterator[bytes]:
            try:
                if (head := fmt.first()) is not None:
                    yield sse(head)
                if first:
                    yield sse(fmt.delta(first))
                async for piece in pieces:
                    yield sse(fmt.delta(piece))
                yield sse(fmt.last(_done(state)))
                if include_usage:
                    yield sse(fmt.usage(_done(state)))
            except ApiError as exc:
                yield sse(exc.body().model_dump_json())
            finally:
                await pieces.aclose()
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await answer(request, chat_job(body), True, body.stream, usage, body.check)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return await answer(request, completion_job(body), False, body.stream, usage,
                            body.check)

    @app.get("/v1/models", response_model=None)
    async def models() -> Response:
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                r = await http.get(f"{coordinator.rstrip('/')}/v1/models",
                                   headers={"Authorization": f"Bearer {api_key}"})
        except httpx.HTTPError as exc:
            return _error(ApiError(502, f"Cannot reach the coordinator: {exc}",
                                   code="coordinator_unreachable", type="server_error"))
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok", "coordinator": coordinator}

    return app


class LocalProxy:
    """The proxy in this process, on a free loopback port, in a thread of its own: the
    Python SDK's way to encrypt end to end without running ``covey proxy``.

    ``with LocalProxy(url, key) as proxy: openai.OpenAI(base_url=proxy.base_url, ...)``.
    """

    def __init__(self, coordinator: str, api_key: str,
                 private: Mapping[str, TokenCodec] | None = None) -> None:
        app = create_proxy_app(coordinator, api_key, private)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                     log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="covey-proxy",
                                        daemon=True)
        self.base_url = ""
        """``http://127.0.0.1:PORT/v1``, once started."""

    def __enter__(self) -> LocalProxy:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the local privacy proxy did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


__all__ = ["LocalProxy", "create_proxy_app"]
