"""``POST /v1/chat/completions`` and ``POST /v1/completions``: parse, serve, respond."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from covey.coordinator.api.requests import chat_job, completion_job
from covey.coordinator.api.serving import Serving
from covey.protocol import Job
from covey.protocol.openai import ChatCompletionRequest, CompletionRequest

router = APIRouter()

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _respond(serving: Serving, job: Job, chat: bool, stream: bool,
                   include_usage: bool) -> JSONResponse | StreamingResponse:
    running, fmt = await serving.start(job, chat)
    if stream:
        return StreamingResponse(serving.stream(running, fmt, include_usage),
                                 media_type="text/event-stream", headers=_SSE_HEADERS)
    body = await serving.complete(running, fmt)
    return JSONResponse(body.model_dump(mode="json"))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request
                           ) -> JSONResponse | StreamingResponse:
    """OpenAI Chat Completions."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request.app.state.serving, chat_job(body), True, body.stream,
                          include_usage)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request
                      ) -> JSONResponse | StreamingResponse:
    """OpenAI (legacy) Completions."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(request.app.state.serving, completion_job(body), False, body.stream,
                          include_usage)
