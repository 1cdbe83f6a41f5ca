"""``POST /v1/embeddings``: OpenAI's embeddings endpoint, billed per input token.

The request holds its maximum cost in escrow (an upper bound on its input tokens, known
before any miner tokenizes it), runs as an :class:`~covey.protocol.Embed` task with failover
(:func:`~covey.coordinator.run.run_embed`), and settles the tokens the miner counted.
"""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Request

from covey.coordinator.api.accounts import Account
from covey.coordinator.api.requests import new_id
from covey.coordinator.api.serving import CLIENT_CLOSED, Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.ledger.pricing import cost
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run import run_embed
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
    """
    sizes = ([len(row) + SPECIAL_TOKENS for row in task.input_ids or ()]
             if task.input is None else
             [len(text.encode()) + SPECIAL_TOKENS for text in task.input])
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
    import struct

    return [Embedding(index=i, embedding=list(struct.unpack(f"<{dimensions}f", r)))
            for i, r in enumerate(rows)]


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, account: Account
                     ) -> EmbeddingList:
    """OpenAI Embeddings; see the module docstring."""
    serving: Serving = request.app.state.serving
    task = Embed(job_id=new_id("emb"), model=body.model, input=body.texts(),
                 input_ids=body.token_ids(), truncate=body.truncate)
    record = RequestRecord(task.job_id, task.model, account, False)
    request.state.logged = True
    serving.admit(record)
    try:
        data, tokens = await _run(serving, task, account, body)
    except ApiError as exc:
        serving.finish(record, exc.status, exc.code)
        raise
    except asyncio.CancelledError:
        serving.finish(record, CLIENT_CLOSED)
        raise
    record.prompt_tokens = tokens
    serving.finish(record, 200)
    return EmbeddingList(id=task.job_id, data=data, model=task.model,
                         usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


async def _run(serving: Serving, task: Embed, account: str, body: EmbeddingRequest
               ) -> tuple[list[Embedding], int]:
    dispatcher, billing = serving.dispatcher, serving.billing
    dispatcher.check(task.model)
    offers = serving.offers(task.model)
    _servable(task.model, offers, body.dimensions)
    bound = input_token_bound(task, max(o.context_length for o in offers))
    hold = asyncio.ensure_future(billing.hold(
        task.job_id, account, cost(billing.price(task.model, offers), bound, 0)))
    try:
        await asyncio.shield(hold)
    except asyncio.CancelledError:
        billing.refund_after(hold, task.job_id, account)
        raise
    try:
        result = await run_embed(dispatcher, task, account, serving.policy, bound)
    except ApiError:
        await billing.refund(task.job_id, account)
        raise
    except BaseException:  # cancelled: the refund runs on its own
        billing.refund(task.job_id, account)
        raise
    settlement = billing.settle(result.outcome)
    if serving.after_job is not None:
        serving.after_job(result.outcome, settlement)
    await settlement
    reply = result.reply
    return _data(reply.vectors, reply.dimensions, body.encoding_format), reply.prompt_tokens
