"""Running a scoring task with the failover policy, to an
:class:`~covey.coordinator.outcome.Outcome`.

Scores move freely between miners (nothing reaches the client before the end). Before an
answer is accepted:

- its shape must fit the task (one output per row; one proof per row when asked; a
  ciphertext for an encrypted row);
- each proof must verify under the model's verifying key, for that row, with that output
  (:class:`~covey.scoring.proofs.ProofVerifier`): a false proof is a failed check, reported
  to ``on_false_proof`` (the verifier slashes) and the task moves to another miner;
- its usage must be true: as many rows as asked, and no more milliseconds of work than the
  coordinator itself waited for the answer (nor than the escrow's bound).

An encrypted row's evaluation keys go to a miner once per session (``key_chunk`` frames);
a miner that dropped them since says ``keys_missing`` and gets them again.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy
from covey.coordinator.job_faults import MinerFault, miner_error, protocol
from covey.coordinator.link import Call, MinerLink, TaskRefused
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import Outcome, ScoreAnswer
from covey.coordinator.router import Dispatcher
from covey.coordinator.run import Try, checked_receipt, with_failover
from covey.protocol import KeyChunk, Score, Scored
from covey.protocol.score import KEY_CHUNK_BYTES, scored_digest

log = logging.getLogger("covey.coordinator.run")

WORK_SLACK_MS = 1000
"""Milliseconds a miner's reported work may exceed the time the coordinator waited for its
answer (clocks and the send's own delay)."""

KeySource = Callable[[str], bytes]
"""The evaluation keys of a digest, for the request's account (raises ApiError 400 when it
has none such)."""

FalseProof = Callable[[MinerSession, Score, Scored, str], None]
"""Told of a miner whose proof did not verify: (its session, the task as sent, its answer,
why)."""

_keys_sent: weakref.WeakKeyDictionary[MinerSession, set[str]] = weakref.WeakKeyDictionary()
"""Per miner session, the evaluation-key digests sent to it (a new session starts empty: a
reconnected miner process holds none)."""


@dataclass(frozen=True)
class ScoreResult:
    """The answer the finishing miner sent (``reply``) and the request's ``outcome``."""

    reply: Scored
    outcome: Outcome


async def run_score(dispatcher: Dispatcher, task: Score, account: str, policy: FailoverPolicy,
                    work_bound: int, keys: KeySource | None = None, verifier: Any = None,
                    on_false_proof: FalseProof | None = None,
                    checkable: bool = True) -> ScoreResult:
    """Run ``task`` on a miner of its model, failing over as the module docstring says.

    ``work_bound``: the most milliseconds of work the escrow was sized for; ``keys``: the
    account's evaluation keys by digest (an encrypted task's); ``verifier``: the model's
    :class:`~covey.scoring.proofs.ProofVerifier` (needed when ``task.proof``).

    Raises:
        ApiError: 404/503/429 from routing, the miner's refusal of the request (400), or
            the last miner's failure once the tries are spent.
    """

    def unfit() -> frozenset[str]:
        if not task.proof:
            return frozenset()
        return frozenset(s.miner_id for s in dispatcher.registry.serving(task.model)
                         if (o := s.offer(task.model)) is None
                         or o.proof_vk != verifier.vk_sha256)

    async def attempt(go: Try) -> ScoreResult:
        session = go.session
        sent = task.model_copy(update={"model_sha256": go.sha256})
        started = time.monotonic()
        reply = await _call(session, sent, policy, keys)
        waited_ms = (time.monotonic() - started) * 1000
        _check_shape(sent, reply)
        if sent.proof:
            await _check_proofs(session, sent, reply, verifier, on_false_proof)
        receipt = checked_receipt(session, sent, reply.receipt, reply.signature,
                                  scored_digest(reply.outputs, reply.encrypted, reply.proofs),
                                  reply.rows, reply.work_ms)
        if receipt is None:
            dispatcher.scores.failure(session.miner_id)
        fault = _usage_fault(sent, reply, waited_ms, work_bound)
        if fault is None and receipt is not None:
            dispatcher.scores.success(session.miner_id, None, None)
        outcome = Outcome(task.job_id, account, task.model, "done", session.miner_id,
                          session.offer(task.model), prompt_tokens=reply.rows,
                          completion_tokens=reply.work_ms, receipt=receipt, fault=fault,
                          failovers=go.failovers, checkable=checkable,
                          answer=ScoreAnswer(sent, reply.outputs, reply.encrypted,
                                             reply.proofs))
        return ScoreResult(reply, outcome)

    return await with_failover(dispatcher, task.model, account, policy, task.job_id, attempt,
                               unfit=unfit)


async def call_score(session: MinerSession, task: Score, stall_timeout: float,
                     keys: KeySource | None) -> Scored:
    """One miner's answer to ``task`` (a validator's run too), the evaluation keys sent
    first when this session has not had them.

    Raises:
        MinerFault: the miner failed or answered out of shape.
        ApiError: the miner refused the request itself (400).
    """
    return await _call(session, task, FailoverPolicy(stall_timeout=stall_timeout), keys)


async def _call(session: MinerSession, task: Score, policy: FailoverPolicy,
                keys: KeySource | None) -> Scored:
    sha256 = task.keys_sha256
    sent_keys = _keys_sent.setdefault(session, set())
    for again in (False, True):
        upload = b""
        if sha256 is not None and sha256 not in sent_keys:
            assert keys is not None, "an encrypted task needs its keys"
            upload = await asyncio.to_thread(keys, sha256)
        sent = task.model_copy(update={"keys_bytes": len(upload) or None})
        try:
            async with MinerLink(session).call(sent, policy.stall_timeout) as call:
                if upload:
                    await _upload(call, upload)
                    sent_keys.add(sha256)  # type: ignore[arg-type]
                reply = await call.next()
        except TaskRefused as refused:
            if refused.frame.code == "keys_missing" and sha256 is not None and not again:
                sent_keys.discard(sha256)  # the miner dropped them: send them again
                continue
            error = miner_error(refused.frame)
            if error.status == 400:
                raise error from None
            raise MinerFault("miner_error", error) from None
        assert isinstance(reply, Scored)
        return reply
    raise protocol("keys_missing right after its keys were sent")


async def _upload(call: Call, data: bytes) -> None:
    for seq, start in enumerate(range(0, len(data), KEY_CHUNK_BYTES)):
        chunk = base64.b64encode(data[start:start + KEY_CHUNK_BYTES]).decode()
        await call.send(KeyChunk(job_id=call.task.job_id, seq=seq, data=chunk))


def _check_shape(task: Score, reply: Scored) -> None:
    """Raises MinerFault (``protocol``) for an answer that does not fit the task."""
    if task.inputs is not None:
        if reply.outputs is None or len(reply.outputs) != len(task.inputs):
            raise protocol(f"{len(reply.outputs or ())} outputs for {len(task.inputs)} rows")
        if task.proof and len(reply.proofs) != len(task.inputs):
            raise protocol(f"{len(reply.proofs)} proofs for {len(task.inputs)} rows")
    elif reply.encrypted is None:
        raise protocol("no ciphertext answering an encrypted row")


async def _check_proofs(session: MinerSession, task: Score, reply: Scored, verifier: Any,
                        on_false_proof: FalseProof | None) -> None:
    """Verify every proof of ``reply`` for its row and output.

    Raises:
        MinerFault: ``false_proof``, after telling ``on_false_proof``.
    """
    from covey.scoring.proofs import ProofError

    assert task.inputs is not None and reply.outputs is not None
    try:
        for i, (row, proof) in enumerate(zip(task.inputs, reply.proofs, strict=True)):
            proved = await asyncio.to_thread(verifier.verify, proof, row)
            if abs(proved - reply.outputs[i]) > 1e-9:
                raise ProofError(f"row {i}: the proof shows {proved}, the answer says "
                                 f"{reply.outputs[i]}")
    except ProofError as exc:
        reason = f"a false proof: {exc}"
        log.warning("%s: miner %s sent %s", task.job_id, session.miner_id[:16], reason)
        if on_false_proof is not None:
            on_false_proof(session, task, reply, reason)
        raise MinerFault("false_proof", ApiError(
            502, "The miner's proof did not verify; no other miner could prove the answer.",
            code="proof_failed", type="server_error")) from None


def _usage_fault(task: Score, reply: Scored, waited_ms: float, work_bound: int) -> str | None:
    """Why ``reply``'s usage report is false, or None."""
    if reply.rows != task.rows:
        return f"reported {reply.rows} rows for a task of {task.rows}"
    if reply.work_ms > min(work_bound, waited_ms + WORK_SLACK_MS):
        return (f"reported {reply.work_ms} ms of work; the coordinator waited "
                f"{waited_ms:.0f} ms and the request allows {work_bound}")
    return None
