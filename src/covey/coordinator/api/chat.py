"""``POST /v1/chat/completions`` and ``POST /v1/completions``: parse, serve, respond."""

from __future__ import annotations

from collections.abc import Awaitable

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


async def _unless_client_leaves(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``; if the client hangs up first, cancel it (see
    :func:`~covey.protocol.openai_stream.unless_client_leaves`)."""
    stayed, response = await unless_client_leaves(request.receive, work)
    return response if stayed and response is not None else Response(status_code=CLIENT_CLOSED)


async def _respond(request: Request, account: str, job: Generate, chat: bool, stream: bool,
                   include_usage: bool, checkable: bool) -> Response:
    serving: Serving = request.app.state.serving
    job = watermarked(job, request.app.state.config.watermark_models)
    record = RequestRecord(job.job_id, job.model, account, stream)
    request.state.logged = True  # from here on the record logs and counts the request
    serving.admit(record)

    async def work() -> Response:
        running, fmt = await serving.start(job, chat, record, checkable=checkable)
        if stream:
            return StreamingResponse(serving.stream(running, fmt, include_usage),
                                     media_type="text/event-stream", headers=_SSE_HEADERS)
        body = await serving.complete(running, fmt)
        # pydantic writes the JSON itself (one pass, in Rust), not a dict for json.dumps
        return Response(body.model_dump_json(), media_type="application/json")

    return await _unless_client_leaves(request, work())


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, account: Account
                           ) -> Response:
    """OpenAI Chat Completions."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, account, chat_job(body), True, body.stream, include_usage,
                          body.check)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, account: Account
                      ) -> Response:
    """OpenAI (legacy) Completions."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request, account, completion_job(body), False, body.stream,
                          include_usage, body.check)
