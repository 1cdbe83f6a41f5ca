"""Running a single-reply task (an embedding) with the failover policy, to an
:class:`~covey.coordinator.outcome.Outcome`; :func:`with_failover` is the loop every
non-streamed runner shares (media tasks too, :mod:`covey.coordinator.run_media`).

A miner that disconnects, stalls, errors or answers out of shape loses the task to another
miner with the same weights, up to :attr:`FailoverPolicy.max_tries` miners in all; a miner's
refusal of the request itself (a 400) ends it. Streamed generations, which resume mid-answer,
have their own runner (:mod:`covey.coordinator.jobs`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy, may_retry, no_takeover
from covey.coordinator.job_faults import MinerFault, miner_error, protocol
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import EmbedAnswer, Outcome
from covey.coordinator.router import Dispatcher
from covey.protocol import Embed, Embedded, Paint, Score, Speak, Transcribe
from covey.protocol.embed import count_vectors, vectors_digest
from covey.protocol.receipts import Receipt, request_digest, verify_receipt

log = logging.getLogger("covey.coordinator.run")
T = TypeVar("T")
MediaTask = Transcribe | Speak | Paint


@dataclass(frozen=True)
class EmbedResult:
    """The vectors a miner returned (``reply``) and the request's ``outcome``."""

    reply: Embedded
    outcome: Outcome


@dataclass(frozen=True)
class Try:
    """One miner's go at a task: the ``session`` (acquired for it, released afterwards),
    the weights digest every try is pinned to (``sha256``; None until a miner announced
    one) and how many miners had the task before (``failovers``)."""

    session: MinerSession
    sha256: str | None
    failovers: int


async def with_failover(dispatcher: Dispatcher, model: str, account: str,
                        policy: FailoverPolicy, job_id: str,
                        attempt: Callable[[Try], Awaitable[T]],
                        may_move: Callable[[], bool] = lambda: True,
                        unfit: Callable[[], frozenset[str]] = frozenset) -> T:
    """``attempt`` on a miner of ``model``, then on others with the same weights while it
    raises :class:`MinerFault` (the failover policy's tries; ``may_move`` False stops it
    early, e.g. once part of an answer that cannot be resumed was delivered). ``unfit``
    names miners of the model that cannot take this task (asked before each try: a proof
    needs a miner holding the right proving key). The session is released after each try;
    a miner at fault is counted against its reputation.

    Raises:
        ApiError: routing's 404/503/429 before any try, the miner's refusal of the
            request (400, from ``attempt``), or the last miner's failure (a 502 saying no
            other miner could take over).
    """
    tried: list[str] = []
    sha256: str | None = None
    fault: MinerFault | None = None
    while fault is None or (may_retry(policy, len(tried), fault) and may_move()):
        try:
            session = await dispatcher.acquire(model, account, sha256,
                                               frozenset(tried) | unfit(), priority=bool(tried))
        except ApiError as exc:
            if fault is None:
                raise
            raise no_takeover(fault, exc) from None
        tried.append(session.miner_id)
        offer = session.offer(model)
        sha256 = sha256 or (offer.sha256 if offer else None)
        try:
            return await attempt(Try(session, sha256, len(tried) - 1))
        except MinerFault as exc:
            fault = exc
            log.warning("%s: miner %s failed (%s)", job_id, session.miner_id[:16], exc.reason)
            if exc.blame:
                dispatcher.scores.failure(session.miner_id)
        finally:
            dispatcher.release(session, account, model)
    assert fault is not None
    raise fault.error


async def run_embed(dispatcher: Dispatcher, task: Embed, account: str, policy: FailoverPolicy,
                    prompt_bound: int, checkable: bool = True) -> EmbedResult:
    """Run ``task`` on a miner of its model, failing over as the module docstring says.

    ``prompt_bound`` is the most input tokens the escrow was sized for: a miner claiming
    more has reported false usage (the outcome's ``fault``; nobody is paid).

    Raises:
        ApiError: 404/503/429 from routing, the miner's refusal of the request (400), or
            the last miner's failure once the tries are spent.
    """

    async def attempt(go: Try) -> EmbedResult:
        session = go.session
        sent = task.model_copy(update={"model_sha256": go.sha256})
        reply = await _call(session, sent, policy)
        receipt = checked_receipt(session, sent, reply.receipt, reply.signature,
                                  vectors_digest(reply.vectors), reply.prompt_tokens)
        if receipt is None:
            dispatcher.scores.failure(session.miner_id)
        usage_fault = None
        if reply.prompt_tokens > prompt_bound:
            usage_fault = (f"reported {reply.prompt_tokens} input tokens, more than the "
                           f"inputs' {prompt_bound}-token bound")
        elif receipt is not None:
            dispatcher.scores.success(session.miner_id, None, None)
        outcome = Outcome(task.job_id, account, task.model, "done", session.miner_id,
                          session.offer(task.model), prompt_tokens=reply.prompt_tokens,
                          receipt=receipt, fault=usage_fault, failovers=go.failovers,
                          checkable=checkable,
                          answer=EmbedAnswer(sent, reply.vectors, reply.dimensions))
        return EmbedResult(reply, outcome)

    return await with_failover(dispatcher, task.model, account, policy, task.job_id, attempt)


async def _call(session: MinerSession, task: Embed, policy: FailoverPolicy) -> Embedded:
    """One miner's answer to ``task``, checked for shape.

    Raises:
        MinerFault: the miner failed, or sent vectors that do not fit the task.
        ApiError: the miner refused the request itself (400).
    """
    try:
        async with MinerLink(session).call(task, policy.stall_timeout) as call:
            reply = await call.next()
    except TaskRefused as refused:
        error = miner_error(refused.frame)
        if error.status == 400:
            raise error from None
        raise MinerFault("miner_error", error) from None
    assert isinstance(reply, Embedded)
    offer = session.offer(task.model)
    try:
        rows = count_vectors(reply.vectors, reply.dimensions)
    except ValueError as exc:
        raise protocol(f"vectors that do not decode: {exc}") from None
    if rows != task.count or (offer is not None and offer.dimensions is not None
                                   and reply.dimensions != offer.dimensions):
        raise protocol(f"{rows} vectors of {reply.dimensions} for {task.count} inputs")
    return reply


def checked_receipt(session: MinerSession, task: Embed | MediaTask | Score,
                    receipt: Receipt | None, signature: str | None, output_sha256: str,
                    units: int, work: int = 0) -> tuple[Receipt, str] | None:
    """The miner's receipt of a single-answer task if signed by it and true to the task,
    its weights, what it sent (``output_sha256``) and its usage (``units`` in, ``work``
    out: a score's milliseconds of work, else 0); else None (logged; the caller counts it
    against the miner's reputation)."""
    r = receipt
    if r is None or signature is None:
        problem = "no receipt"
    elif r.miner != session.miner_id or not verify_receipt(r, signature):
        problem = "a receipt not signed by this miner"
    elif (r.job_id, r.model_sha256, r.request_sha256, r.output_sha256, r.prompt_tokens,
          r.completion_tokens) != (task.job_id, task.model_sha256, request_digest(task),
                                   output_sha256, units, work):
        problem = "a receipt that does not match the task"
    else:
        return r, signature
    log.warning("%s: miner %s sent %s", task.job_id, session.miner_id[:16], problem)
    return None
