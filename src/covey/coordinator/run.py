"""Running a single-reply task (an embedding) with the failover policy, to an
:class:`~covey.coordinator.outcome.Outcome`.

A miner that disconnects, stalls, errors or answers out of shape loses the task to another
miner with the same weights, up to :attr:`FailoverPolicy.max_tries` miners in all; a miner's
refusal of the request itself (a 400) ends it. Streamed generations, which resume mid-answer,
have their own runner (:mod:`covey.coordinator.jobs`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy, may_retry, no_takeover
from covey.coordinator.job_faults import MinerFault, miner_error, protocol
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import EmbedAnswer, Outcome
from covey.coordinator.router import Dispatcher
from covey.protocol import Embed, Embedded
from covey.protocol.embed import count_vectors, vectors_digest
from covey.protocol.receipts import Receipt, request_digest, verify_receipt

log = logging.getLogger("covey.coordinator.run")


@dataclass(frozen=True)
class EmbedResult:
    """The vectors a miner returned (``reply``) and the request's ``outcome``."""

    reply: Embedded
    outcome: Outcome


async def run_embed(dispatcher: Dispatcher, task: Embed, account: str, policy: FailoverPolicy,
                    prompt_bound: int, checkable: bool = True) -> EmbedResult:
    """Run ``task`` on a miner of its model, failing over as the module docstring says.

    ``prompt_bound`` is the most input tokens the escrow was sized for: a miner claiming
    more has reported false usage (the outcome's ``fault``; nobody is paid).

    Raises:
        ApiError: 404/503/429 from routing, the miner's refusal of the request (400), or
            the last miner's failure once the tries are spent.
    """
    tried: list[str] = []
    sha256: str | None = None
    fault: MinerFault | None = None
    while fault is None or may_retry(policy, len(tried), fault):
        try:
            session = await dispatcher.acquire(task.model, account, sha256, frozenset(tried),
                                               priority=bool(tried))
        except ApiError as exc:
            if fault is None:
                raise
            raise no_takeover(fault, exc) from None
        tried.append(session.miner_id)
        offer = session.offer(task.model)
        sha256 = sha256 or (offer.sha256 if offer else None)
        sent = task.model_copy(update={"model_sha256": sha256})
        try:
            reply = await _call(session, sent, policy)
        except MinerFault as exc:
            fault = exc
            log.warning("embedding %s: miner %s failed (%s)", task.job_id,
                        session.miner_id[:16], exc.reason)
            if exc.blame:
                dispatcher.scores.failure(session.miner_id)
            continue
        finally:
            dispatcher.release(session, account, task.model)
        receipt = _checked_receipt(session, sent, reply)
        if receipt is None:
            dispatcher.scores.failure(session.miner_id)
        usage_fault = None
        if reply.prompt_tokens > prompt_bound:
            usage_fault = (f"reported {reply.prompt_tokens} input tokens, more than the "
                           f"inputs' {prompt_bound}-token bound")
        elif receipt is not None:
            dispatcher.scores.success(session.miner_id, None, None)
        outcome = Outcome(task.job_id, account, task.model, "done", session.miner_id, offer,
                          prompt_tokens=reply.prompt_tokens, receipt=receipt,
                          fault=usage_fault, failovers=len(tried) - 1, checkable=checkable,
                          answer=EmbedAnswer(sent, reply.vectors, reply.dimensions))
        return EmbedResult(reply, outcome)
    assert fault is not None
    raise fault.error


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


def _checked_receipt(session: MinerSession, task: Embed, reply: Embedded
                     ) -> tuple[Receipt, str] | None:
    """The miner's receipt if signed by it and true to the task, its weights, the vectors
    it sent and its usage; else None (logged; counted against its reputation)."""
    r, signature = reply.receipt, reply.signature
    if r is None or signature is None:
        problem = "no receipt"
    elif r.miner != session.miner_id or not verify_receipt(r, signature):
        problem = "a receipt not signed by this miner"
    elif (r.job_id, r.model_sha256, r.request_sha256, r.output_sha256, r.prompt_tokens,
          r.completion_tokens) != (task.job_id, task.model_sha256, request_digest(task),
                                   vectors_digest(reply.vectors), reply.prompt_tokens, 0):
        problem = "a receipt that does not match the task"
    else:
        return r, signature
    log.warning("embedding %s: miner %s sent %s", task.job_id, session.miner_id[:16], problem)
    return None
