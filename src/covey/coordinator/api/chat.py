"""``POST /v1/chat/completions`` and ``POST /v1/completions``: parse, serve, respond.

The FastAPI routes here define the endpoints (their OpenAPI schema, and every refusal's
shape); :mod:`covey.coordinator.api.fast` serves their common case without FastAPI's
per-request machinery, through the same :func:`respond`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.requests import chat_job, completion_job, watermarked
from covey.coordinator.api.serving import CLIENT_CLOSED, Serving
from covey.coordinator.metrics import RequestRecord
from covey.protocol import Generate
from covey.protocol.openai import ChatCompletionRequest, CompletionRequest
from covey.protocol.openai_stream import unless_client_leaves

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class Asked:
    """What a validated chat or completion request asks for: the miner ``job``, whether
    it is a chat (``chat``), streamed (``stream``) with a usage chunk (``include_usage``),
    and whether validators may re-check it (``checkable``)."""

    job: Generate
    chat: bool
    stream: bool
    include_usage: bool
    checkable: bool


def chat_asked(body: ChatCompletionRequest) -> Asked:
    """What a chat request asks for.

    Raises:
        ApiError: 400 for what the network does not serve (see
            :func:`~covey.protocol.requests.chat_job`).
    """
    return _asked(chat_job(body), True, body)


def completion_asked(body: CompletionRequest) -> Asked:
    """What a (legacy) completion request asks for.

    Raises:
        ApiError: 400 for what the network does not serve (see
            :func:`~covey.protocol.requests.completion_job`).
    """
    return _asked(completion_job(body), False, body)


def _asked(job: Generate, chat: bool, body: ChatCompletionRequest | CompletionRequest
           ) -> Asked:
    return Asked(job, chat, body.stream,
                 bool(body.stream_options and body.stream_options.include_usage), body.check)


async def respond(state: Any, receive: Callable[[], Awaitable[dict[str, Any]]], account: str,
                  asked: Asked, admitted: Callable[[], None]) -> Response:
    """Serve ``asked`` for ``account`` with the app's ``state``; ``receive`` is the
    request's ASGI channel, watched for the client hanging up (the job is then cancelled
    and the response is a bare 499). ``admitted()`` is called once the request's own
    record logs and counts it (refusals before that are the error handler's to count).

    Raises:
        ApiError: 429 over a per-key limit, 404/503 no model or miner, 402 too few
            credits, a miner's 400, … before any byte is sent.
    """
    serving: Serving = state.serving
    job = watermarked(asked.job, state.config.watermark_models)
    stream = asked.stream
    record = RequestRecord(job.job_id, job.model, account, stream)
    admitted()
    serving.admit(record)

    async def work() -> Response:
        running, fmt = await serving.start(job, asked.chat, record, checkable=asked.checkable)
        if stream:
            return StreamingResponse(serving.stream(running, fmt, asked.include_usage),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        body = await serving.complete(running, fmt)
        # pydantic writes the JSON itself (one pass, in Rust), not a dict for json.dumps
        return Response(body.model_dump_json(), media_type="application/json")

    try:
        stayed, response = await unless_client_leaves(receive, work())
    except Exception:  # a bug's 500: the key's slot must not stay taken for ever
        serving.finish(record, 500, "internal_error")  # nothing when already finished
        raise
    return response if stayed and response is not None else Response(status_code=CLIENT_CLOSED)


def _logged(request: Request) -> Callable[[], None]:
    def mark() -> None:
        request.state.logged = True  # from here on the record logs and counts the request
    return mark


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, account: Account
                           ) -> Response:
    """OpenAI Chat Completions."""
    return await respond(request.app.state, request.receive, account, chat_asked(body),
                         _logged(request))


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, account: Account
                      ) -> Response:
    """OpenAI (legacy) Completions."""
    return await respond(request.app.state, request.receive, account,
                         completion_asked(body), _logged(request))
