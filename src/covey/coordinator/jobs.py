"""Running one job: dispatch, frame stream, failover to another miner, cancellation and
slot release."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from covey.coordinator.billing import prompt_token_bound
from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy, may_retry, no_takeover
from covey.coordinator.job_faults import MinerFault, miner_error, protocol
from covey.coordinator.link import Call, MinerLink, TaskRefused
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import Outcome, TextAnswer
from covey.coordinator.router import Dispatcher
from covey.protocol import (
    Delta,
    Done,
    Generate,
    Resume,
    Started,
)
from covey.protocol.receipts import Receipt, request_digest, verify_receipt

log = logging.getLogger("covey.coordinator.jobs")

Sealer = Callable[[MinerSession], Awaitable[Generate]]
"""Makes a sealed job's frame for the miner it was routed to (the client seals it); raises
:class:`~covey.coordinator.errors.ApiError` when the client cannot."""


class RunningJob:
    """A job on its way through one or more miners; iterate :meth:`frames` for its deltas
    and its done.

    When the miner fails (disconnects, stalls, errors), :meth:`frames` moves the job to
    another miner with the same weights, which resumes from the exact token ids delivered so
    far (:class:`~covey.protocol.Resume`), so the client sees one unbroken answer. Always
    call :meth:`close` (it cancels the job on the miner if it is still running and frees the
    slot); ``async with`` does it.

    After the end: ``started`` is the first miner's ``started``, ``done`` the final
    ``done`` with usage for the whole answer, ``delivered`` the token ids handed out,
    ``failed`` whether the job ended on a miner's failure, ``session`` the last miner,
    ``failovers`` how many times the job moved.
    """

    def __init__(self, job: Generate, dispatcher: Dispatcher, account: str, policy: FailoverPolicy,
                 on_close: Callable[[RunningJob], Awaitable[object] | None] | None = None,
                 on_failover: Callable[[str], None] | None = None,
                 sealer: Sealer | None = None) -> None:
        self.job = job
        self.account = account
        self.policy = policy
        self.done: Done | None = None
        self.started: Started | None = None
        self.failed = False
        self.error: ApiError | None = None
        """The error the job failed with, once it failed on miners."""
        self.failovers = 0
        self.session: MinerSession | None = None
        self.settlement: Awaitable[object] | None = None
        self.receipt: tuple[Receipt, str] | None = None
        """The finishing miner's receipt and signature, once checked against the job."""
        self.usage_fault: str | None = None
        """Why the finishing miner's usage report is false (None when it is true): it
        claimed another number of tokens than it streamed, another prompt length than it
        started with, more prompt tokens than the prompt's bytes allow, or a ``length`` finish
        before the limit. A failed check (DESIGN.md, Trust). A prompt count inflated
        consistently but within the bound is left to the validator's recount."""
        self.first_token_at: float | None = None
        """``time.monotonic()`` when the first delta arrived (None before)."""
        self.checkable = True
        """False when the client opted out of re-checks for this request."""
        self.key_for: Callable[[MinerSession], Awaitable[str | None]] | None = None
        """For a sealed job: asks the client to seal the session key to a validator (None
        when the client declines or has gone)."""
        self.sealed_stream: list[str] = []
        """A sealed job's deltas as the finishing miner sent them (a validator opens them)."""
        self._sealer = sealer
        self._sent = job
        self._count = 0
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._chars = 0
        self._tried: list[str] = []
        self._sha256: str | None = None
        self._dispatcher = dispatcher
        self._on_close = on_close
        self._on_failover = on_failover
        self._call: Call | None = None
        self._attached = False
        self._closed = False
        self._attempt_ids = 0
        self._attempt_prompt = 0
        self._attempt_start = 0.0
        self._attempt_first: float | None = None
        self._attempt_last = 0.0
        self._attempt_text = hashlib.sha256()

    @property
    def model_sha256(self) -> str | None:
        """The weights the job is pinned to (set when the first miner took it)."""
        return self._sha256

    @property
    def sealed(self) -> bool:
        """Whether the job is end-to-end encrypted (its content is not the coordinator's
        to see: ``token_ids`` and ``text`` stay empty)."""
        return self._sealer is not None

    @property
    def sent(self) -> Generate:
        """The job as the current miner got it (a sealed job: the box sealed to it)."""
        return self._sent

    @property
    def token_ids(self) -> list[int]:
        """The token ids handed to the client so far (all miners; none when sealed)."""
        return self._ids

    @property
    def text(self) -> str:
        """The text handed to the client so far (all miners)."""
        return "".join(self._texts)

    @property
    def delivered(self) -> int:
        """Token ids handed to the client so far, over all miners (sealed ones counted by
        the miners' ``sealed_tokens``)."""
        return self._count

    async def __aenter__(self) -> RunningJob:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close()
        if exc_type is None and self.settlement is not None:
            # The answer is complete: let the charge land before [DONE]. Shielded: a client
            # that leaves now must not cancel the settlement itself.
            await asyncio.shield(self.settlement)

    async def _next(self) -> Started | Delta | Done:
        """The next frame of the current miner's call.

        Raises:
            MinerFault: the miner disconnected, stalled or failed.
            ApiError: the miner refused the request itself (a 400).
        """
        assert self._call is not None
        try:
            item = await self._call.next()
        except TaskRefused as refused:
            error = miner_error(refused.frame)
            if error.status == 400:
                if refused.frame.code == "context_length_exceeded" and self._larger_context():
                    # Not the miner's fault: another miner offers a longer context.
                    raise MinerFault("context_length", error, blame=False) from None
                raise error from None
            raise MinerFault("miner_error", error) from None
        if not isinstance(item, Started | Delta | Done):
            raise protocol(f"a {item.type} frame in a job")
        return item

    def _larger_context(self) -> bool:
        """Whether a live miner not tried yet offers this model with a longer context than
        the current one."""
        mine = self.session.claim(self.job.model) if self.session else None
        if mine is None:
            return False
        return any(o is not None and o.context_length > mine.context_length
                   and s.miner_id not in self._tried
                   for s in self._dispatcher.registry.serving(self.job.model)
                   for o in [s.offer(self.job.model)])

    async def start(self) -> None:
        """Reserve a miner, send the job and wait until a miner has started it (moving to
        another miner if the first fails before that).

        Raises:
            ApiError: 404/503/429 from routing, the miner's refusal of the request (400), or
                the last miner's failure once :attr:`FailoverPolicy.max_tries` are spent.
        """
        try:
            await self._dispatch()
        except MinerFault as fault:
            await self._fail_over(fault)

    async def _dispatch(self) -> None:
        session = await self._dispatcher.acquire(
            self.job.model, self.account, self._sha256, frozenset(self._tried),
            priority=bool(self._tried))
        self.session = session
        self._attached = True
        self._tried.append(session.miner_id)
        offer = session.offer(self.job.model)
        if self._sha256 is None and offer is not None:
            self._sha256 = offer.sha256
        if self._sealer is not None:
            # The client seals the job to this miner (after a failover with the resume
            # point it alone knows); the slot stays reserved meanwhile.
            job = (await self._sealer(session)).model_copy(
                update={"model_sha256": self._sha256, "resume_tokens": self._count})
        else:
            job = self.job.model_copy(update={
                "model_sha256": self._sha256,
                "resume": Resume(token_ids=tuple(self._ids), text_chars=self._chars)
                if self._ids else None})
        self._sent = job
        self.sealed_stream = []
        self._attempt_ids = 0
        self._attempt_first = None
        self._attempt_start = time.monotonic()
        self._attempt_text = hashlib.sha256()
        self._call = MinerLink(session).call(job, self.policy.stall_timeout)
        await self._call.open()
        frame = await self._next()
        if not isinstance(frame, Started):
            raise protocol("no 'started' frame")
        self._attempt_prompt = frame.prompt_tokens
        if self.started is None:
            self.started = frame

    async def _fail_over(self, fault: MinerFault) -> None:
        """Drop the failed miner and start the job on another, until one starts it.

        Raises:
            ApiError: tries spent or no other miner: the last failure, for the client.
        """
        while True:
            failed = self.session
            assert failed is not None
            log.warning("job %s: miner %s failed (%s) after %d tokens", self.job.job_id,
                        failed.miner_id[:16], fault.reason, self._count)
            if fault.blame:
                self._dispatcher.scores.failure(failed.miner_id)
            self._detach()
            if not may_retry(self.policy, len(self._tried), fault):
                self.failed = True
                self.error = fault.error
                raise fault.error
            try:
                await self._dispatch()
                self.failovers += 1
                if self._on_failover is not None:
                    self._on_failover(fault.reason)
                return
            except MinerFault as again:
                fault = again
            except ApiError as exc:
                if exc.status == 400:  # the next miner refused the request: nobody is paid
                    self.failed = True
                    self.error = exc
                    raise
                self.failed = True
                self.error = no_takeover(fault, exc)
                raise self.error from None

    def _detach(self) -> None:
        """Leave the current miner: cancel there if unfinished, free the slot."""
        if not self._attached or self.session is None:
            return
        self._attached = False
        if self._call is not None:
            self._call.close()
        self._dispatcher.release(self.session, self.account, self.job.model)

    async def frames(self) -> AsyncIterator[Delta | Done]:
        """Deltas, then the final ``done`` (usage for the whole answer); a miner's failure
        moves the job to another miner unseen. Raises :class:`ApiError` like :meth:`start`.
        """
        while True:
            try:
                frame = await self._next()
                if isinstance(frame, Started):
                    raise protocol("second 'started'")
            except MinerFault as fault:
                await self._fail_over(fault)
                continue
            now = time.monotonic()
            if isinstance(frame, Delta):
                if self._attempt_first is None:
                    self._attempt_first = now
                    if self.first_token_at is None:
                        self.first_token_at = now
                self._attempt_last = now
                self._attempt_ids += frame.tokens
                self._count += frame.tokens
                self._ids.extend(frame.token_ids)
                self._chars += len(frame.text)
                self._texts.append(frame.text)
                if frame.sealed is not None:
                    self.sealed_stream.append(frame.sealed)
                self._attempt_text.update((frame.sealed or frame.text).encode())
                yield frame
                continue
            self.receipt = self._checked_receipt(frame)
            self.usage_fault = self._recount(frame)
            if self.receipt is None and self.session is not None:
                # A missing or false receipt counts as a failed check (DESIGN.md, Trust).
                self._dispatcher.scores.failure(self.session.miner_id)
            elif self.usage_fault is None:  # a false usage is the verifier's to punish
                self._score_success()
            resumed = self._count - self._attempt_ids
            self.done = frame.model_copy(update={
                "prompt_tokens": self.started.prompt_tokens if self.started else 0,
                "completion_tokens": resumed + frame.completion_tokens})
            yield self.done
            return

    def _checked_receipt(self, done: Done) -> tuple[Receipt, str] | None:
        """The miner's receipt if it is signed by this miner and matches the job, the weights,
        the text received from it and its usage; else None (logged, and the caller counts it
        against the miner's reputation; the answer itself is still delivered and billed
        within what was streamed)."""
        r, signature, session = done.receipt, done.signature, self.session
        assert session is not None
        if r is None or signature is None:
            problem = "no receipt"
        elif r.miner != session.miner_id or not verify_receipt(r, signature):
            problem = "a receipt not signed by this miner"
        elif (r.job_id, r.model_sha256, r.request_sha256, r.output_sha256,
              r.prompt_tokens, r.completion_tokens) != (
                self.job.job_id, self._sha256, request_digest(self._sent),
                self._attempt_text.hexdigest(), done.prompt_tokens, done.completion_tokens):
            problem = "a receipt that does not match the job"
        else:
            return r, signature
        log.warning("job %s: miner %s sent %s", self.job.job_id, session.miner_id[:16],
                    problem)
        return None

    def _recount(self, done: Done) -> str | None:
        """Why ``done``'s usage is false, or None: the coordinator counts the token ids this
        miner streamed and knows the prompt length it started with and the job's limits."""
        if done.completion_tokens != self._attempt_ids:
            return (f"reported {done.completion_tokens} completion tokens but streamed "
                    f"{self._attempt_ids}")
        if done.prompt_tokens != self._attempt_prompt:
            return (f"reported {done.prompt_tokens} prompt tokens but started with "
                    f"{self._attempt_prompt}")
        offer = self.session.claim(self.job.model) if self.session else None
        bound = prompt_token_bound(self.job)
        if done.prompt_tokens > bound:
            return (f"reported {done.prompt_tokens} prompt tokens, more than the prompt's "
                    f"{bound}-token bound")
        cap = self.job.params.max_tokens
        total = self._count
        if (done.finish_reason == "length" and offer is not None
                and (cap is None or total < cap)
                and self._attempt_prompt + total < offer.context_length):
            return (f"reported finish 'length' after {total} tokens (max_tokens {cap}, "
                    f"context {offer.context_length})")
        return None

    def _score_success(self) -> None:
        if self.session is None:
            return
        ttft = (self._attempt_first - self._attempt_start
                if self._attempt_first is not None else None)
        elapsed = self._attempt_last - (self._attempt_first or self._attempt_last)
        tps = (self._attempt_ids - 1) / elapsed if self._attempt_ids > 1 and elapsed > 0 else None
        self._dispatcher.scores.success(self.session.miner_id, ttft, tps)

    def outcome(self, stream: bool) -> Outcome:
        """The job's frozen :class:`~covey.coordinator.outcome.Outcome`, once it ended.

        Finished: the miner's usage, but never more completion tokens than the token ids
        the miners streamed, nor a prompt other than the one started. The client left
        mid-answer: the prompt and the tokens it was sent (``stream``; none when the
        answer was to come whole at the end). Failed, or never started: nothing.
        """
        session = self.session
        miner = session.miner_id if session else None
        offer = session.claim(self.job.model) if session else None
        base = Outcome(self.job.job_id, self.account, self.job.model, "failed", miner, offer,
                       failovers=self.failovers, checkable=self.checkable)
        prompt = self.started.prompt_tokens if self.started else 0
        if self.done is not None and miner is not None:
            answer = TextAnswer(
                (self._sent if self.sealed else self.job).model_copy(
                    update={"model_sha256": self._sha256}),
                self._ids, self.text, self.done.finish_reason, self._count,
                self.sealed_stream, self.key_for)
            return replace(base, ending="done", prompt_tokens=prompt,
                           completion_tokens=min(self.done.completion_tokens, self._count),
                           receipt=self.receipt, fault=self.usage_fault, answer=answer)
        if self.failed or self.started is None or miner is None:
            return base
        return replace(base, ending="client_closed", prompt_tokens=prompt,
                       completion_tokens=self._count if stream else 0)

    def close(self) -> None:
        """Cancel on the miner if unfinished; free the slot; settle. Safe to call twice.

        Synchronous on purpose: it runs while the request's task is being cancelled (the
        client left), where any ``await`` would be cancelled too and the slot would leak.
        """
        if self._closed:
            return
        self._closed = True
        self._detach()
        if self._on_close is not None:
            self.settlement = self._on_close(self)


async def start_job(dispatcher: Dispatcher, job: Generate, account: str, policy: FailoverPolicy,
                    on_close: Callable[[RunningJob], Awaitable[object] | None] | None = None,
                    on_failover: Callable[[str], None] | None = None,
                    sealer: Sealer | None = None) -> RunningJob:
    """Reserve a miner for ``job``, send it, and wait until a miner has started it.

    ``on_close`` is called once when the job ends, however it ends (see
    :attr:`RunningJob.done`, ``failed``, ``started`` and ``delivered``); ``on_failover`` with
    a reason each time the job moves to another miner; ``sealer`` makes the frame of a
    sealed job for each miner it is routed to.

    Raises:
        ApiError: see :meth:`RunningJob.start`.
    """
    running = RunningJob(job, dispatcher, account, policy, on_close, on_failover, sealer)
    try:
        await running.start()
    except BaseException:
        running.close()
        raise
    return running
