"""Checking OpenAI requests and turning them into miner jobs.

Parameters Covey cannot honour are refused with 400 naming the field, rather than ignored.
The coordinator and the local privacy proxy (``covey proxy``) share these checks.
"""

from __future__ import annotations

import itertools
import secrets

from covey.protocol import Generate, SamplingParams
from covey.protocol.errors import ApiError
from covey.protocol.frames import ChatMessage
from covey.protocol.openai import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 8 * 2**20
"""8 MiB: far above any prompt that fits a context window, far below the miner's frame cap."""

_PREFIX = secrets.token_hex(8)
_COUNTER = itertools.count(1)


def new_id(kind: str) -> str:
    """A request id: ``kind`` + a random per-process prefix + a counter (24 hex digits).

    Unique across restarts (the prefix is 64 random bits) and cheap: drawing fresh random
    bytes per request cost more CPU than any other single step of a short request.
    """
    return f"{kind}-{_PREFIX}{next(_COUNTER):08x}"


def too_large(limit: int = MAX_BODY_BYTES) -> ApiError:
    """The 413 for a request body over ``limit`` bytes."""
    return ApiError(413, f"Request body is larger than {limit} bytes.",
                    code="request_too_large")


def _unsupported(param: str, what: str) -> ApiError:
    subject = f"'{param}' {what}".strip()
    return ApiError(400, f"{subject} is not supported by this network yet.",
                    param=param, code="unsupported_parameter")


def _sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
              ) -> SamplingParams:
    if req.n is not None and req.n > 1:
        raise _unsupported("n", "greater than 1")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=req.stop_list(),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        watermark=req.watermark,
    )


def watermarked(job: Generate, models: frozenset[str]) -> Generate:
    """``job``, watermarked when its model is one the network watermarks every answer of
    (``covey coordinator --watermark MODEL``); a request can only add a watermark."""
    if job.params.watermark or job.model not in models:
        return job
    return job.model_copy(update={"params": job.params.model_copy(update={"watermark": True})})


def chat_job(req: ChatCompletionRequest) -> Generate:
    """The miner job for a chat request.

    Raises:
        ApiError: 400 for ``n`` > 1, tools, logprobs or a non-text response format.
    """
    if req.tools:
        raise _unsupported("tools", "(function calling)")
    if req.logprobs:
        raise _unsupported("logprobs", "")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "other than text")
    max_tokens = req.max_completion_tokens or req.max_tokens
    return Generate(
        job_id=new_id("chatcmpl"),
        model=req.model,
        messages=tuple(ChatMessage(role=m.role, content=m.text()) for m in req.messages),
        params=_sampling(req, max_tokens),
    )


def completion_job(req: CompletionRequest) -> Generate:
    """The miner job for a completion request.

    Raises:
        ApiError: 400 for several prompts, ``n`` > 1, ``echo``, ``logprobs``, ``suffix`` or
            ``best_of`` > 1.
    """
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise _unsupported("prompt", "as a list of several prompts")
        prompt = prompt[0]
    if req.echo:
        raise _unsupported("echo", "")
    if req.logprobs is not None:
        raise _unsupported("logprobs", "")
    if req.suffix:
        raise _unsupported("suffix", "")
    if req.best_of is not None and req.best_of > 1:
        raise _unsupported("best_of", "greater than 1")
    return Generate(
        job_id=new_id("cmpl"),
        model=req.model,
        prompt=prompt,
        params=_sampling(req, req.max_tokens),
    )
