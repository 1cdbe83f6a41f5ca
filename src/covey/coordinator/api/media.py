"""What the media routes (transcription, speech, images) share: finding a model of the
right kind, holding the escrow, running the task with failover, settling, and streaming;
:func:`answer` serves the embeddings route too.

A request holds its maximum cost (``bound`` units at the highest price among the model's
miners) before any miner sees it, settles what the finishing miner reports (the units its
receipt covers), and is refunded whole when it fails or the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import Request, Response

from covey.coordinator.api.serving import CLIENT_CLOSED, R, Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.ledger.pricing import Price, cost
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.run_media import Deliver, MediaResult, MediaTask, run_media
from covey.protocol import ModelKind, ModelOffer, Segment, SpeechChunk
from covey.protocol.openai_stream import unless_client_leaves

T = TypeVar("T")

ROUTES: dict[str, str] = {
    "chat": "POST /v1/chat/completions",
    "embedding": "POST /v1/embeddings",
    "transcription": "POST /v1/audio/transcriptions",
    "speech": "POST /v1/audio/speech",
    "image": "POST /v1/images/generations",
    "scoring": "POST /v1/scores",
}
"""Where each kind of model takes requests (named in errors that send a request
elsewhere)."""


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def offers_of(serving: Serving, model: str, kind: ModelKind) -> list[ModelOffer]:
    """The live offers of ``model``, which must be a ``kind`` model.

    Raises:
        ApiError: 404 unknown model, 503 no live miner, 400 (param ``model``) a model of
            another kind, saying where it takes requests.
    """
    serving.dispatcher.check(model)
    offers = serving.offers(model)
    if any(o.kind != kind for o in offers):
        other = offers[0].kind
        raise ApiError(400, f"'{model}' is {_a(other)} model, not {_a(kind)} model: send it to "
                       f"{ROUTES[other]}. GET /v1/models lists each model's kind.",
                       code="invalid_value", param="model")
    return offers


def quote(serving: Serving, model: str, offers: Sequence[ModelOffer], bound: int, work: int = 0
          ) -> tuple[int, Price]:
    """(maximum cost in µcr, price) of ``bound`` input units of ``model`` and ``work``
    output units (a score's milliseconds of work)."""
    price = serving.terms(model, offers).price
    return cost(price, bound, work), price


async def hold_and_run(serving: Serving, task: MediaTask, account: str, offers:
                       list[ModelOffer], bound: int, deliver: Deliver | None = None,
                       audio: bytes = b"") -> MediaResult:
    """Hold the maximum cost of ``bound`` units, run ``task`` with failover, settle; the
    escrow is refunded whole on any failure, or when the caller is cancelled.

    Raises:
        ApiError: 402 too few credits, routing's 404/503/429, a miner's 400, a 502 when
            the miners failed.
    """
    max_cost, _ = quote(serving, task.model, offers, bound)
    return await serving.billed(task.job_id, account, max_cost, lambda: run_media(
        serving.dispatcher, task, account, serving.policy, bound, deliver, audio))


async def answer(serving: Serving, request: Request, record: RequestRecord,
                 work: Callable[[], Awaitable[tuple[R, Response]]]) -> Response:
    """Run a non-streamed single-answer request (embeddings, transcription, images): its
    record finished with the status, the work cancelled (and refunded) when the client
    hangs up first."""

    async def run() -> Response:
        _, response = await _recorded(serving, record, work())
        return response

    stayed, response = await unless_client_leaves(request.receive, run())
    return response if stayed and response is not None else Response(status_code=CLIENT_CLOSED)


async def _recorded(serving: Serving, record: RequestRecord,
                    work: Awaitable[tuple[R, T]]) -> tuple[R, T]:
    try:
        result, out = await work
    except ApiError as exc:
        serving.finish(record, exc.status, exc.code)
        raise
    except asyncio.CancelledError:
        serving.finish(record, CLIENT_CLOSED)
        raise
    except BaseException:
        serving.finish(record, 500, "internal_error")
        raise
    outcome = result.outcome
    record.miner, record.failovers = outcome.miner_id, outcome.failovers
    record.prompt_tokens = outcome.prompt_tokens
    serving.finish(record, 200)
    return result, out


_END = object()


async def streamed(serving: Serving, record: RequestRecord,
                   start: Callable[[Deliver], Awaitable[MediaResult]]
                   ) -> tuple[Segment | SpeechChunk | MediaResult, AsyncIterator[
                       Segment | SpeechChunk | MediaResult | ApiError]]:
    """Start a streamed media request and wait for its first item, so a request the
    miners refuse (or that cannot be routed or paid) still gets a plain 4xx/5xx before
    any header goes out.

    Returns the first item (a segment or audio chunk, or the whole result when nothing
    was streamed) and an iterator over the rest, ending with the :class:`MediaResult` or
    an :class:`ApiError` that struck after the first item. Closing the iterator (the
    client left) cancels the task on the miner and refunds the request.

    Raises:
        ApiError: the request failed before its first item.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def deliver(item: Segment | SpeechChunk) -> None:
        queue.put_nowait(item)

    async def run() -> None:
        try:
            result, _ = await _recorded(serving, record, _pair(start(deliver)))
            queue.put_nowait(result)
        except ApiError as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(_END)

    task = asyncio.ensure_future(run())
    try:
        first = await queue.get()
    except asyncio.CancelledError:
        task.cancel()
        raise
    if isinstance(first, ApiError):
        raise first

    async def rest() -> AsyncIterator[Segment | SpeechChunk | MediaResult | ApiError]:
        try:
            while (item := await queue.get()) is not _END:
                yield item  # type: ignore[misc]
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return first, rest()  # type: ignore[return-value]


async def _pair(work: Awaitable[MediaResult]) -> tuple[MediaResult, None]:
    return await work, None


async def chain(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    """``first``, then what ``rest`` yields."""
    yield first
    async for item in rest:
        yield item
