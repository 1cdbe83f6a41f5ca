"""Running a media task (transcription, speech, images) with the failover policy, to an
:class:`~covey.coordinator.outcome.Outcome`.

The rules are :mod:`covey.coordinator.failover`'s: a miner that disconnects, stalls, errors
or answers out of shape loses the task to another miner with the same weights. What may move
depends on what the client already has:

- a transcription resumes after the last segment delivered (the next miner starts at that
  segment's end, ``Transcribe.offset``), its segments numbered on;
- speech moves only while none of its audio has been delivered (a file cannot be spliced);
- images move freely (nothing is delivered before the end).

The finishing miner's receipt must cover the task (hence, for a transcription, the
audio's SHA-256), its weights, the bytes it sent and its usage; usage above the escrow's
bound is a false report (the outcome's ``fault``: nobody is paid, the verifier punishes).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from covey.coordinator.failover import FailoverPolicy
from covey.coordinator.job_faults import MinerFault, miner_error, protocol
from covey.coordinator.link import Call, MinerLink, TaskRefused
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import ImageAnswer, Outcome, SpeechAnswer, TranscriptAnswer
from covey.coordinator.router import Dispatcher
from covey.coordinator.run import MediaTask, Try, checked_receipt, with_failover
from covey.protocol import (
    AudioChunk,
    Paint,
    Painted,
    Segment,
    Speak,
    SpeechChunk,
    Spoken,
    Transcribe,
    Transcribed,
)
from covey.protocol.audio import AUDIO_CHUNK_BYTES, transcript_digest
from covey.protocol.image import images_digest
from covey.protocol.receipts import billed_units

log = logging.getLogger("covey.coordinator.run")

Deliver = Callable[[Segment | SpeechChunk], Awaitable[None]]
"""Hands a segment (renumbered) or an audio chunk to the client as it arrives."""


@dataclass
class Delivered:
    """What the client has been handed so far, over all miners of one request."""

    segments: list[Segment] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class MediaResult:
    """The finishing miner's last frame and the request's ``outcome``; ``delivered``
    holds every segment or audio byte the client got."""

    last: Transcribed | Spoken | Painted
    outcome: Outcome
    delivered: Delivered


async def run_media(dispatcher: Dispatcher, task: MediaTask, account: str,
                    policy: FailoverPolicy, bound: int, deliver: Deliver | None = None,
                    audio: bytes = b"", checkable: bool = True) -> MediaResult:
    """Run ``task`` on a miner of its model, failing over as the module docstring says.

    ``bound`` is the most units (seconds, characters, tiles) the escrow was sized for;
    ``audio`` a transcription's upload, sent in ``audio_chunk`` frames after the task.

    Raises:
        ApiError: 404/503/429 from routing, the miner's refusal of the request (400), or
            the last miner's failure once the tries are spent (or once speech was partly
            delivered).
    """
    got = Delivered()

    async def attempt(go: Try) -> MediaResult:
        session = go.session
        update: dict[str, object] = {"model_sha256": go.sha256}
        if isinstance(task, Transcribe) and got.segments:
            update["offset"] = max(task.offset, got.segments[-1].end)
        sent = task.model_copy(update=update)
        last, mine = await try_on(session, sent, policy.stall_timeout, audio, got, deliver)
        units = billed_units(last)
        receipt = checked_receipt(session, sent, last.receipt, last.signature,
                                  _output_digest(last, mine, got), units)
        if receipt is None:
            dispatcher.scores.failure(session.miner_id)
        usage_fault = None
        if units > bound:
            usage_fault = f"reported {units} units of usage, more than the request's {bound}"
        elif receipt is not None:
            dispatcher.scores.success(session.miner_id, None, None)
        outcome = Outcome(task.job_id, account, task.model, "done", session.miner_id,
                          session.offer(task.model), prompt_tokens=units, receipt=receipt,
                          fault=usage_fault, failovers=go.failovers, checkable=checkable,
                          answer=_answer(sent, last, mine, audio, got))
        return MediaResult(last, outcome, got)

    # Audio already in the client's hands cannot be redone elsewhere.
    return await with_failover(dispatcher, task.model, account, policy, task.job_id, attempt,
                               may_move=lambda: not (isinstance(task, Speak) and got.audio))


async def try_on(session: MinerSession, task: MediaTask, stall_timeout: float,
                 audio: bytes, got: Delivered, deliver: Deliver | None = None
                 ) -> tuple[Transcribed | Spoken | Painted, list[str]]:
    """One miner's go at ``task`` (``audio``: a transcription's upload), adding what it
    streams to ``got``: (its last frame, the texts of the segments it sent; empty for
    speech, whose audio is all in ``got``, and images).

    Raises:
        MinerFault: the miner failed or answered out of shape.
        ApiError: the miner refused the request itself (400).
    """
    mine: list[str] = []
    try:
        async with MinerLink(session).call(task, stall_timeout) as call:
            if isinstance(task, Transcribe):
                await _upload(call, audio)
            async for reply in call:
                if isinstance(reply, Segment):
                    numbered = reply.model_copy(update={"id": len(got.segments)})
                    got.segments.append(numbered)
                    mine.append(reply.text)
                    if deliver is not None:
                        await deliver(numbered)
                elif isinstance(reply, SpeechChunk):
                    got.audio += base64.b64decode(reply.data)
                    if deliver is not None:
                        await deliver(reply)
                else:
                    assert isinstance(reply, Transcribed | Spoken | Painted)
                    _check_shape(task, reply)
                    return reply, mine
    except TaskRefused as refused:
        error = miner_error(refused.frame)
        if error.status == 400:
            raise error from None
        raise MinerFault("miner_error", error) from None
    raise protocol("the answer ended without its last frame")  # pragma: no cover


async def _upload(call: Call, audio: bytes) -> None:
    for seq, start in enumerate(range(0, len(audio), AUDIO_CHUNK_BYTES)):
        data = base64.b64encode(audio[start:start + AUDIO_CHUNK_BYTES]).decode()
        await call.send(AudioChunk(job_id=call.task.job_id, seq=seq, data=data))


def _check_shape(task: MediaTask, last: Transcribed | Spoken | Painted) -> None:
    if isinstance(task, Paint) and isinstance(last, Painted) and len(last.images) != task.n:
        raise protocol(f"{len(last.images)} images for n={task.n}")


def _output_digest(last: Transcribed | Spoken | Painted, mine: list[str], got: Delivered
                   ) -> str:
    """What a receipt's ``output_sha256`` must be for what the miner sent. Speech never
    moves once audio was delivered, so all of ``got.audio`` is the finishing miner's."""
    if isinstance(last, Transcribed):
        return transcript_digest(mine)
    if isinstance(last, Spoken):
        return hashlib.sha256(got.audio).hexdigest()
    return images_digest(last.images)


def _answer(sent: MediaTask, last: Transcribed | Spoken | Painted, mine: list[str],
            audio: bytes, got: Delivered) -> TranscriptAnswer | SpeechAnswer | ImageAnswer:
    if isinstance(sent, Transcribe):
        return TranscriptAnswer(sent, audio, "".join(mine))
    if isinstance(sent, Speak):
        assert isinstance(last, Spoken)
        return SpeechAnswer(sent, bytes(got.audio), last.duration, last.sample_rate)
    assert isinstance(last, Painted)
    return ImageAnswer(sent, last.images)
