"""``POST /v1/embeddings``: OpenAI's embeddings endpoint, billed per input token.

The request holds its maximum cost in escrow (an upper bound on its input tokens, known
before any miner tokenizes it), runs as an :class:`~covey.protocol.Embed` task with failover
(:func:`~covey.coordinator.run.run_embed`), and settles the tokens the miner counted.
"""

from __future__ import annotations

import base64
import struct

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from covey.coordinator.api import media
from covey.coordinator.api.accounts import Account
from covey.coordinator.api.requests import new_id
from covey.coordinator.api.serving import Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.ledger.pricing import Price, cost
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run import EmbedResult, run_embed
from covey.protocol import Embed, ModelOffer
from covey.protocol.openai_embeddings import (
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)

router = APIRouter()

SPECIAL_TOKENS = 4
"""Tokens a tokenizer may add around one input ([CLS] … [SEP], <s> … </s>), with room."""


def input_token_bound(task: Embed, context_length: int) -> int:
    """An upper bound on ``task``'s input tokens before any miner tokenizes it.

    Token ids count exactly (plus the special tokens); a text has at most one token per
    UTF-8 byte (byte-level BPE, WordPiece and SentencePiece with byte fallback never use
    more). With ``truncate`` no input counts past ``context_length``.

    Raises:
        ApiError: 400 naming ``input`` for text that is not valid Unicode (a lone
            surrogate): JSON could not carry it to a miner.
    """
    try:
        sizes = ([len(row) + SPECIAL_TOKENS for row in task.input_ids or ()]
                 if task.input is None else
                 [len(text.encode()) + SPECIAL_TOKENS for text in task.input])
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"An input is not valid Unicode ({exc.reason} at character "
                       f"{exc.start}).", code="invalid_value", param="input") from None
    if task.truncate:
        sizes = [min(n, context_length) for n in sizes]
    return sum(sizes)


def _servable(model: str, offers: list[ModelOffer], dimensions: int | None) -> None:
    """Refuse a model that does not embed, or a ``dimensions`` it cannot give.

    Raises:
        ApiError: 400 naming ``model`` or ``dimensions``.
    """
    if any(o.kind != "embedding" for o in offers):
        raise ApiError(400, f"'{model}' is a {offers[0].kind} model, not an embedding model; "
                       "GET /v1/models lists each model's kind.", code="invalid_value",
                       param="model")
    native = {o.dimensions for o in offers}
    if dimensions is not None and native != {dimensions}:
        raise ApiError(400, f"'{model}' returns vectors of {'/'.join(map(str, native))} "
                       f"dimensions and cannot shorten them to {dimensions}; leave out "
                       "'dimensions'.", code="invalid_value", param="dimensions")


def _data(vectors: str, dimensions: int, encoding: str) -> list[Embedding]:
    raw = base64.b64decode(vectors)
    width = 4 * dimensions
    rows = [raw[i:i + width] for i in range(0, len(raw), width)]
    if encoding == "base64":
        return [Embedding(index=i, embedding=base64.b64encode(r).decode())
                for i, r in enumerate(rows)]
    return [Embedding(index=i, embedding=list(struct.unpack(f"<{dimensions}f", r)))
            for i, r in enumerate(rows)]


def _quote(serving: Serving, task: Embed, dimensions: int | None) -> tuple[int, int, Price]:
    """(most input tokens, maximum cost in µcr, price) of ``task``.

    Raises:
        ApiError: 404 unknown model, 503 no live miner, 400 not an embedding model or a
            ``dimensions`` it cannot give.
    """
    serving.dispatcher.check(task.model)
    offers = serving.offers(task.model)
    _servable(task.model, offers, dimensions)
    terms = serving.terms(task.model, offers)
    bound = input_token_bound(task, terms.context)
    return bound, cost(terms.price, bound, 0), terms.price


def _task(body: EmbeddingRequest) -> Embed:
    """The task of ``body`` (its text is checked by :func:`input_token_bound`, before any
    credit moves)."""
    return Embed(job_id=new_id("emb"), model=body.model, input=body.texts(),
                 input_ids=body.token_ids(), truncate=body.truncate)


def quote_embeddings(serving: Serving, body: EmbeddingRequest) -> dict[str, object]:
    """``POST /v1/quote`` for an embeddings body: the most input tokens and what they may
    cost (µcr), without running it. Raises as :func:`_quote`."""
    bound, max_cost, price = _quote(serving, _task(body), body.dimensions)
    return {"object": "quote", "model": body.model, "max_prompt_tokens": bound,
            "max_completion_tokens": 0, "max_cost": max_cost, "unit": "µcr",
            "price": {"prompt": price.prompt, "completion": price.completion,
                      "per_tokens": 1_000_000}}


@router.post("/v1/embeddings", response_model=None)
async def embeddings(body: EmbeddingRequest, request: Request, account: Account) -> Response:
    """OpenAI Embeddings; see the module docstring. A client that hangs up first cancels
    the task on the miner and pays nothing."""
    serving: Serving = request.app.state.serving
    task = _task(body)
    record = RequestRecord(task.job_id, task.model, account, False)
    request.state.logged = True
    serving.admit(record)

    async def work() -> tuple[EmbedResult, Response]:
        result = await _run(serving, task, account, body.dimensions)
        reply = result.reply
        usage = EmbeddingUsage(prompt_tokens=reply.prompt_tokens,
                               total_tokens=reply.prompt_tokens)
        answer = EmbeddingList(id=task.job_id, model=task.model, usage=usage,
                               data=_data(reply.vectors, reply.dimensions,
                                          body.encoding_format))
        return result, JSONResponse(answer.model_dump(mode="json"))

    return await media.answer(serving, request, record, work)


async def _run(serving: Serving, task: Embed, account: str, dimensions: int | None
               ) -> EmbedResult:
    """Hold the maximum cost, run ``task`` with failover, settle; the escrow is refunded
    whole on any failure (or when the client leaves)."""
    bound, max_cost, _ = _quote(serving, task, dimensions)
    return await serving.billed(task.job_id, account, max_cost, lambda: run_embed(
        serving.dispatcher, task, account, serving.policy, bound))
