"""Billing around each request: API-key auth, quotes, escrow holds and settlement.

Holds and settlements go to the ledger's writer thread as futures
(:meth:`~covey.coordinator.ledger.store.Ledger.submit`), with no task or thread per call:
a settlement is written whether or not its request is still there (the futures still
pending are kept in ``_tasks`` for the shutdown's drain), so a client leaving can never
skip it. Other ledger calls are blocking database I/O and run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request

from covey.coordinator.errors import ApiError
from covey.coordinator.ledger import InsufficientFunds
from covey.coordinator.ledger.bank import Bank
from covey.coordinator.ledger.pricing import Price, cost
from covey.coordinator.ledger.store import Operation
from covey.coordinator.outcome import LedgerOp, Outcome, Refund, settle
from covey.protocol import Generate, ModelOffer

log = logging.getLogger("covey.coordinator.billing")

DEFAULT_PRICE = Price(prompt=100_000, completion=200_000)
"""Floor price of a model with none configured: 0.1 credit per 1M prompt tokens and 0.2 per
1M completion tokens (µcr per 1M tokens)."""
KIND_PRICES = {
    "transcription": Price(prompt=4_000_000, completion=0),
    "speech": Price(prompt=10_000_000, completion=0),
    "image": Price(prompt=1_000_000_000, completion=0),
    "scoring": Price(prompt=10_000_000, completion=2_000_000),
}
"""Floor prices of media models with none configured, µcr per 1M units: 4 µcr per second
of audio, 10 µcr per character, 1,000 µcr per 256-pixel image tile. They keep the ratios of
OpenAI's list prices to its small text models' (a minute of transcription ≈ 40k input tokens,
a character of speech ≈ 100 tokens). Scoring: 10 µcr per row (a row is a few hundred
multiply-adds, far less than a token, but each is a decision someone pays for), and 2 µcr per
millisecond of proving or encrypted work (a 5 s proof costs 10,000 µcr, 0.01 credit)."""

# Chat templates add a few tokens per message (role markers, separators); 16 covers the
# templates llama.cpp ships with room to spare.
_TEMPLATE_TOKENS_PER_MESSAGE = 16

LEDGER_CALLERS = 256
"""Threads that may wait on the ledger at once (holds and settlements in flight): the
ledger commits up to 256 operations together."""

T = TypeVar("T")


def prompt_token_bound(job: Generate) -> int:
    """An upper bound on the prompt's tokens, known before any miner tokenizes it.

    Byte-level BPE and SentencePiece-with-byte-fallback tokenizers never use more tokens
    than UTF-8 bytes (each byte has its own token), plus the template's special tokens.
    A sealed job carries its bound (the size of its sealed content, which holds the prompt).
    """
    if job.prompt_bound is not None:
        return job.prompt_bound
    if job.prompt_ids is not None:  # token ids (private models): the count is exact
        return len(job.prompt_ids)
    if job.messages is not None:
        return sum(len(m.content.encode()) + _TEMPLATE_TOKENS_PER_MESSAGE
                   for m in job.messages) + _TEMPLATE_TOKENS_PER_MESSAGE
    return len((job.prompt or "").encode()) + 2


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key", type="invalid_request_error")


class Billing:
    """Prices per model (µcr per 1M tokens) and the money around each request."""

    def __init__(self, bank: Bank, prices: dict[str, Price]) -> None:
        self.bank = bank
        self.prices = prices
        self._tasks: set[asyncio.Future[object]] = set()
        # Holds and settlements wait on the ledger's group commit, which commits whatever is
        # queued at once: with asyncio's default pool (CPU count + 4 threads) no more than a
        # handful could wait, so commits would stay tiny. Waiting threads cost no CPU.
        self._pool = ThreadPoolExecutor(LEDGER_CALLERS, thread_name_prefix="ledger-call")

    async def ledger_call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a blocking ledger function on the ledger callers' thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def price(self, model: str, offers: Sequence[ModelOffer] = ()) -> Price:
        """The price of ``model``: the network's floor (by the offers' kind when none is
        configured), or the highest ask among ``offers`` when it is above the floor (µcr per
        1M units: tokens, seconds, characters or tiles)."""
        kind = offers[0].kind if offers else "chat"
        floor = self.prices.get(model, KIND_PRICES.get(kind, DEFAULT_PRICE))
        return Price(max([floor.prompt, *(o.ask_prompt for o in offers)]),
                     max([floor.completion, *(o.ask_completion for o in offers)]))

    def quote(self, job: Generate, context_length: int, offers: Sequence[ModelOffer] = (),
              price: Price | None = None) -> tuple[int, int, int]:
        """(prompt token bound, completion token cap, maximum cost in µcr) for ``job``, at
        ``price``, by default the highest any of ``offers`` may charge (:meth:`price`)."""
        if price is None:
            price = self.price(job.model, offers)
        prompt = min(prompt_token_bound(job), context_length)
        completion = min(job.params.max_tokens or context_length, context_length)
        # The miner stops at the context's end, so prompt + completion ≤ context length:
        # the dearest real request is one of these two corners.
        room = max(context_length - completion, 0)
        worst = max(cost(price, min(prompt, room), completion),
                    cost(price, prompt, max(0, min(completion, context_length - prompt))))
        return prompt, completion, worst

    async def authenticate(self, request: Request) -> str:
        """The account of the request's ``Authorization: Bearer`` key.

        Raises:
            ApiError: 401 without a key or with an unknown one.
        """
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise _unauthorized("You didn't provide an API key. Send 'Authorization: Bearer "
                                "<key>'; get a key with `covey signup` or POST /v1/accounts.")
        return await self.account_of(key.strip())

    async def account_of(self, key: str) -> str:
        """The account an API key belongs to.

        Raises:
            ApiError: 401 for an unknown or revoked key.
        """
        account = self.bank.cached_account(key)  # the common case: no thread hop
        if account is None:
            account = await asyncio.to_thread(self.bank.authenticate, key)
        if account is None:
            raise _unauthorized("Incorrect API key provided.")
        return account

    def hold(self, job_id: str, account: str, amount: int) -> asyncio.Future[None]:
        """Escrow ``amount`` µcr for ``job_id``: a future, done once the hold is written
        (from the event loop; no task of its own).

        Raises (from the future):
            ApiError: 402 ``insufficient_quota`` when the balance cannot cover it.
        """
        op = self.bank.hold_op(job_id, account, amount)
        if op is None:  # nothing to hold (a free model)
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return self.bank.ledger.submit(op, _too_poor)  # type: ignore[arg-type]

    def apply(self, op: LedgerOp) -> asyncio.Future[object]:
        """Carry out a settlement (:func:`~covey.coordinator.outcome.settle`): a charge
        pays the miner, takes the fee and refunds the rest, storing the miner's receipt;
        a refund returns the whole escrow. Runs on its own; await to wait for it (its
        result is None when it failed: logged, and the escrow stays open for start-up
        recovery to refund)."""
        ledger_op: Operation[object] = (
            self.bank.refund_op(op.job_id, op.account) if isinstance(op, Refund) else  # type: ignore[assignment]
            self.bank.settle_op(op.job_id, op.account, op.miner_id, op.amount, op.usage,
                                op.receipt, op.shares, op.shard_receipts))
        job_id = op.job_id

        def failed(exc: BaseException) -> None:
            log.error("settling %s failed", job_id, exc_info=exc)

        future = self.bank.ledger.submit(ledger_op, failed)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        # Shielded: a caller cancelled while awaiting (the client left) must not cancel the
        # settlement's future, which others (the verifier) await too.
        return asyncio.shield(future)

    def settle(self, outcome: Outcome) -> asyncio.Future[object]:
        """Settle ``outcome`` at the price of its model and finishing miner's offer."""
        price = self.price(outcome.model, [outcome.offer] if outcome.offer else [])
        return self.apply(settle(outcome, price))

    def refund(self, job_id: str, account: str) -> asyncio.Future[object]:
        """Return ``job_id``'s whole escrow to ``account`` (see :meth:`apply`)."""
        return self.apply(Refund(job_id, account))

    def refund_after(self, hold: Awaitable[object], job_id: str, account: str) -> None:
        """Once ``hold`` has finished (landed or failed), refund the job's escrow, if any."""

        async def later() -> object:
            with contextlib.suppress(Exception):
                await hold
            return await self.refund(job_id, account)

        future = asyncio.ensure_future(later())
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for settlements still running (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.shutdown(wait=True)


def _too_poor(exc: BaseException) -> None:
    """A hold's error as the client gets it: 402 for a balance that cannot cover it.

    Raises:
        ApiError: 402 ``insufficient_quota``; any other error as it is.
    """
    if isinstance(exc, InsufficientFunds):
        raise ApiError(
            402, f"Your balance ({exc.balance} µcr) cannot cover this request's maximum "
            f"cost ({exc.needed} µcr). Ask for less (max_tokens, a shorter input, fewer or "
            "smaller images) or add credits.",
            code="insufficient_quota", type="insufficient_quota") from None
    raise exc
