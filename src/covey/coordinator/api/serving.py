"""Serving chat and completion requests: non-streaming bodies and SSE streams.

The same job machinery serves both endpoints; a small formatter per endpoint builds OpenAI's
response and chunk shapes. A stream that fails after its headers went out ends with an error
event and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from covey.coordinator.billing import Billing
from covey.coordinator.chain import ChainJob, start_chain
from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy
from covey.coordinator.jobs import RunningJob, Sealer, start_job
from covey.coordinator.ledger.pricing import Price
from covey.coordinator.link import encode_task
from covey.coordinator.metrics import Metrics, RequestRecord
from covey.coordinator.outcome import Outcome
from covey.coordinator.quotas import KeyLimits
from covey.coordinator.router import Dispatcher
from covey.coordinator.shards import incomplete, shard_sessions, shard_status
from covey.protocol import Delta, Generate, JobId, ModelOffer
from covey.protocol.openai import (
    ChatCompletion,
    Completion,
)
from covey.protocol.openai_stream import (
    SSE_DONE,
    ChatFormatter,
    CompletionFormatter,
    Formatter,
    Meta,
    sse,
)


@dataclass(frozen=True)
class Terms:
    """The largest context (tokens) and highest price (µcr per 1M) among a model's offers,
    and whether every one is a private model's."""

    context: int
    price: Price
    private: bool


class _Ran(Protocol):
    @property
    def outcome(self) -> Outcome: ...


R = TypeVar("R", bound=_Ran)

CLIENT_CLOSED = 499
"""Status logged for a request whose client left before the answer (nginx's convention)."""


def fingerprint(running: RunningJob) -> str:
    """``system_fingerprint``: the miner now serving the job."""
    return f"miner-{running.session.miner_id[:16]}" if running.session else "miner-none"


def _decode_rate(running: RunningJob) -> float | None:
    """Tokens per second after the first, over the whole answer (failovers included)."""
    if running.first_token_at is None or running.delivered < 2:
        return None
    elapsed = time.monotonic() - running.first_token_at
    return (running.delivered - 1) / elapsed if elapsed > 0 else None


class Serving:
    """Runs jobs for both endpoints, with failover (``policy``), per-key limits, metrics and
    the request log."""

    def __init__(self, dispatcher: Dispatcher, billing: Billing, policy: FailoverPolicy,
                 metrics: Metrics, limits: KeyLimits,
                 after_job: Callable[[Outcome, Awaitable[object]], None] | None = None
                 ) -> None:
        self.after_job = after_job
        """Called with the outcome of each job that finished on a miner and its settlement
        (the verifier's hook)."""
        self.dispatcher = dispatcher
        self.billing = billing
        self.policy = policy
        self.metrics = metrics
        self.limits = limits
        self.score_keys: Any = None
        """Clients' registered evaluation keys (a :class:`~covey.coordinator.he_keys.
        KeyStore`, set by the app)."""
        self.proof_verifiers: dict[str, Any] = {}
        """Model name → its :class:`~covey.scoring.proofs.ProofVerifier` (the verifying
        keys this coordinator was given)."""
        self.on_false_proof: Callable[..., None] | None = None
        """Told of a miner whose proof did not verify (the verifier's slash)."""
        self._memo: dict[str, tuple[tuple[ModelOffer, ...], Terms]] = {}

    def quote(self, job: Generate, offers: Sequence[ModelOffer] | None = None
              ) -> tuple[int, int, int, Price]:
        """(prompt token bound, completion token cap, maximum cost in µcr, price) of
        ``job`` among the live miners serving its model (``offers``, when the caller has
        them): the largest context any offers and the highest ask bound what it may cost.

        Raises:
            ApiError: 404 unknown model, 503 no live miner (with the minimum stake), 400
                a model of another kind (embeddings).
        """
        if offers is None:
            offers = self._sharded_offers(job.model)
            if offers is None:
                self.dispatcher.check(job.model)
                offers = self.offers(job.model)
            self._refuse_kind(job, offers)
        terms = self.terms(job.model, offers)
        prompt, completion, max_cost = self.billing.quote(job, terms.context, offers,
                                                          terms.price)
        return prompt, completion, max_cost, terms.price

    def terms(self, model: str, offers: Sequence[ModelOffer]) -> Terms:
        """What ``offers`` (:meth:`offers`, or a sharded model's) agree to serve ``model``
        on, computed once per set of the registry's offers: every request would otherwise
        walk all of them (O(miners)) several times."""
        memo = self._memo.get(model)
        if memo is not None and memo[0] is offers:  # the registry keeps one tuple per change
            return memo[1]
        terms = Terms(max((o.context_length for o in offers), default=0),
                       self.billing.price(model, offers),
                       bool(offers) and all(o.private for o in offers))
        if isinstance(offers, tuple):
            self._memo[model] = (offers, terms)
        return terms

    def _sharded_offers(self, model: str) -> list[ModelOffer] | None:
        """The shard offers of ``model`` when a chain of shards serves it (no live miner
        serves it whole); None otherwise.

        Raises:
            ApiError: 503 when its shards leave blocks without a miner.
        """
        registry = self.dispatcher.registry
        if registry.serving(model):
            return None
        status = shard_status(registry, model)
        if status is None:
            return None
        if not status.complete:
            raise incomplete(model, status)
        return [o for _, o in shard_sessions(registry, model)]

    def offers(self, model: str) -> tuple[ModelOffer, ...]:
        """The offers of the live miners serving ``model``."""
        return self.dispatcher.registry.offers(model)

    @staticmethod
    def _refuse_kind(job: Generate, offers: Sequence[ModelOffer]) -> None:
        if offers and offers[0].kind != "chat":
            raise ApiError(400, f"'{job.model}' is an {offers[0].kind} model: send it to "
                           f"POST /v1/embeddings. GET /v1/models lists each model's kind.",
                           code="invalid_value", param="model")

    def refuse_unservable(self, job: Generate, offers: Sequence[ModelOffer], text: bool
                          ) -> None:
        """Refuse, before any miner sees it, what a model's miners (``offers``) cannot
        serve: a generation on a model of another kind (embeddings), text (``text``) or a
        watermark for a private model, whose miners take token ids made with its key and
        know no vocabulary.

        Raises:
            ApiError: 400 ``invalid_value`` naming ``model`` or ``watermark``.
        """
        Serving._refuse_kind(job, offers)
        if not offers or not self.terms(job.model, offers).private:
            return
        if text:
            raise ApiError(400, f"'{job.model}' is a private model: its miners take token "
                           "ids made with its key, never text. Send requests through `covey "
                           f"proxy --private {job.model}=KEYFILE:PLAIN.gguf`.",
                           code="invalid_value", param="model")
        if job.params.watermark:
            raise ApiError(400, f"'{job.model}' is a private model: its answers cannot be "
                           "watermarked (detection needs its vocabulary).",
                           code="invalid_value", param="watermark")

    async def billed(self, job_id: JobId, account: str, max_cost: int,
                     run: Callable[[], Awaitable[R]]) -> R:
        """Hold ``max_cost`` µcr of ``account`` in escrow for ``job_id``, ``run`` the task
        (a single-answer runner: embeddings, media), settle its outcome and hand it to the
        verifier; the escrow is refunded whole on any failure, or when the caller is
        cancelled. The result waits for its settlement, so the balance and the receipt are
        current when the client reads the answer.

        Raises:
            ApiError: 402 too few credits, or whatever ``run`` raises.
        """
        billing = self.billing
        hold = billing.hold(job_id, account, max_cost)
        try:
            await asyncio.shield(hold)
        except asyncio.CancelledError:
            billing.refund_after(hold, job_id, account)
            raise
        try:
            result = await run()
        except ApiError:
            await billing.refund(job_id, account)
            raise
        except BaseException:  # cancelled: the refund runs on its own
            billing.refund(job_id, account)
            raise
        settlement = billing.settle(result.outcome)
        if self.after_job is not None:
            self.after_job(result.outcome, settlement)
        # Shielded: a client that leaves now cannot cancel the charge.
        await asyncio.shield(settlement)
        return result

    def admit(self, record: RequestRecord) -> None:
        """Apply the account's limits to a new request.

        Raises:
            ApiError: 429 over a per-key limit (the refusal is counted and logged).
        """
        try:
            self.limits.enter(record.account)
        except ApiError as exc:
            record.status, record.code = exc.status, exc.code
            self.metrics.finish(record)
            raise

    def finish(self, record: RequestRecord, status: int, code: str | None = None) -> None:
        """End an admitted request once: log it, count it, release its per-key slot."""
        if record.status is not None:
            return
        record.status, record.code = status, code
        self.limits.leave(record.account)
        self.metrics.finish(record)

    def _on_close(self, record: RequestRecord, stream: bool
                  ) -> Callable[[RunningJob], Awaitable[object]]:
        def close(running: RunningJob) -> Awaitable[object]:
            outcome = running.outcome(stream)
            record.miner, record.failovers = outcome.miner_id, outcome.failovers
            if running.first_token_at is not None:
                record.ttft_s = running.first_token_at - record.arrived
            if outcome.ending == "done":
                record.prompt_tokens = outcome.prompt_tokens
                record.completion_tokens = outcome.completion_tokens
                record.decode_tps = _decode_rate(running)
                self.finish(record, 200)
            elif outcome.ending == "client_closed":
                record.prompt_tokens = outcome.prompt_tokens
                record.completion_tokens = outcome.completion_tokens
                self.finish(record, CLIENT_CLOSED)
            elif running.error is not None:
                self.finish(record, running.error.status, running.error.code)
            settlement = self.billing.settle(outcome)
            if outcome.ending == "done" and self.after_job is not None:
                self.after_job(outcome, settlement)
            return settlement
        return close

    async def start(self, job: Generate, chat: bool, record: RequestRecord, *,
                    sealer: Sealer | None = None, checkable: bool = True, text: bool = True
                    ) -> tuple[RunningJob, Formatter]:
        """Hold the maximum cost and dispatch ``job``; raises :class:`ApiError` (404, 503,
        402, 429, a miner's 400 …) before any byte is sent to the client.
        ``record.stream``: the answer goes out token by token (a client that leaves then
        pays for what it got). The record is finished here on an error, or when the job
        closes. ``sealer`` makes a sealed job's frame for each miner it is routed to;
        ``checkable`` False keeps the answer from being re-checked; ``text`` False says the
        (sealed) prompt is token ids, as a private model needs."""
        try:
            running, fmt = await self._start(job, chat, record, sealer, text)
            running.checkable = checkable
            return running, fmt
        except ApiError as exc:
            self.finish(record, exc.status, exc.code)
            raise
        except asyncio.CancelledError:
            self.finish(record, CLIENT_CLOSED)
            raise
        except Exception:  # a bug's 500: the key's slot must not stay taken for ever
            self.finish(record, 500, "internal_error")
            raise

    async def _start(self, job: Generate, chat: bool, record: RequestRecord,
                     sealer: Sealer | None, text: bool) -> tuple[RunningJob, Formatter]:
        account = record.account
        encode_task(job)  # text JSON cannot carry is a 400 here, before any credit moves
        sharded = self._sharded_offers(job.model)  # an incomplete one: 503, nothing held
        if sharded is not None:
            return await self._start_chain(job, chat, record, sealer, sharded)
        self.dispatcher.check(job.model)
        offers = self.offers(job.model)
        self.refuse_unservable(job, offers, text)
        _, _, max_cost, _ = self.quote(job, offers)
        return await self._held(job, chat, record, max_cost, lambda: start_job(
            self.dispatcher, job, account, self.policy, self._on_close(record, record.stream),
            lambda reason: self.metrics.failovers.labels(job.model, reason).inc(), sealer))

    async def _held(self, job: Generate, chat: bool, record: RequestRecord, max_cost: int,
                    start: Callable[[], Awaitable[RunningJob | ChainJob]]
                    ) -> tuple[RunningJob, Formatter]:
        """Hold ``max_cost`` µcr of the account in escrow and ``start`` the job; the escrow
        is refunded when it does not start (or the client leaves meanwhile).

        Raises:
            ApiError: 402, or whatever ``start`` raises.
        """
        account = record.account
        hold = self.billing.hold(job.job_id, account, max_cost)
        try:
            await asyncio.shield(hold)
        except asyncio.CancelledError:
            # The client left while the hold was being written: once it lands, undo it.
            self.billing.refund_after(hold, job.job_id, account)
            raise
        try:
            running = await start()
        except ApiError:
            await self.billing.refund(job.job_id, account)
            raise
        except BaseException:  # cancelled while queued: refund on its own
            self.billing.refund(job.job_id, account)
            raise
        meta = Meta(id=job.job_id, created=int(time.time()), model=job.model,
                    fingerprint=fingerprint(running))  # type: ignore[arg-type]
        fmt: Formatter = ChatFormatter(meta) if chat else CompletionFormatter(meta)
        return running, fmt  # type: ignore[return-value]

    async def _start_chain(self, job: Generate, chat: bool, record: RequestRecord,
                           sealer: Sealer | None, offers: list[ModelOffer]
                           ) -> tuple[RunningJob, Formatter]:
        """Hold the maximum cost and start ``job`` on a chain of shards (a sharded
        model: :mod:`covey.coordinator.chain`).

        Raises:
            ApiError: 400 for what a chain cannot serve (a sealed request, a watermark,
                token ids), 503 when the model is incomplete, 402, 429, a shard's 400.
        """
        refused = ("a sealed request (each shard would need the prompt or sees the "
                   "answer's hidden states)" if sealer is not None
                   else "a watermark" if job.params.watermark
                   else "prompt token ids" if job.prompt_ids is not None else None)
        if refused is not None:
            raise ApiError(400, f"'{job.model}' is a sharded model, served by a chain of "
                           f"miners; it cannot take {refused}.", code="invalid_value",
                           param="model")
        _, _, max_cost, _ = self.quote(job, offers)
        return await self._held(job, chat, record, max_cost, lambda: start_chain(
            job, self.dispatcher.registry, self.dispatcher.scores, record.account, self.policy,
            self._on_close(record, record.stream),  # type: ignore[arg-type]
            lambda reason: self.metrics.failovers.labels(job.model, reason).inc(),
            self.metrics, self.dispatcher.policy.timeout))

    async def run_internal(self, job: Generate, account: str,
                           fund: Callable[[int], Awaitable[object]]) -> None:
        """Serve ``job`` for one of the network's own accounts (a canary) exactly as a
        user's non-streamed chat request: limits, hold, routing, settlement, receipt and
        ``after_job``. ``fund(max_cost)`` runs before the hold, to cover it.

        Raises:
            ApiError: as a user's request would get it (no miner, queue full, …).
        """
        _, _, max_cost, _ = self.quote(job)
        await fund(max_cost)
        record = RequestRecord(job.job_id, job.model, account, False)
        self.admit(record)
        running, fmt = await self.start(job, True, record)
        await self.complete(running, fmt)

    async def complete(self, running: RunningJob, fmt: Formatter) -> ChatCompletion | Completion:
        """Collect the whole answer (non-streaming)."""
        parts: list[str] = []
        async with running:
            async for frame in running.frames():
                if isinstance(frame, Delta):
                    parts.append(frame.text)
                else:
                    fmt.m.fingerprint = fingerprint(running)
                    return fmt.whole("".join(parts), frame)
        raise AssertionError("frames() ends with done")  # pragma: no cover

    async def stream(self, running: RunningJob, fmt: Formatter, include_usage: bool
                     ) -> AsyncIterator[bytes]:
        """SSE events: chunks, the finish chunk, the usage chunk if asked, ``[DONE]``.

        If the client goes away, the generator is closed and the job cancelled on the miner.
        """
        try:
            async with running:
                first = fmt.first()
                if first is not None:
                    yield sse(first)
                served = running.session
                async for frame in running.frames():
                    if running.session is not served:  # failed over
                        served = running.session
                        fmt.reroute(fingerprint(running))
                    if isinstance(frame, Delta):
                        if frame.text:
                            yield sse(fmt.delta(frame.text))
                        continue
                    yield sse(fmt.last(frame))
                    if include_usage:
                        yield sse(fmt.usage(frame))
        except ApiError as exc:
            yield sse(exc.body().model_dump_json())
        yield SSE_DONE
