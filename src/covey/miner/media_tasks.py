"""The miner agent's part for media and scoring tasks: transcription, speech, images, scores.

A transcription's audio follows its task in ``audio_chunk`` frames, gathered into a
temporary file and checked against the task's declared size and SHA-256 before the backend
reads it; segments and audio chunks go out as the backend makes them; every task ends with
its final frame carrying the miner's signed receipt. A score's evaluation keys, when they
come with it, follow in ``key_chunk`` frames gathered the same way (:meth:`MinerAgent._signed
<covey.miner.agent.MinerAgent._signed>`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

from websockets.asyncio.client import ClientConnection

from covey.miner.backends.base import (
    Backend,
    BackendError,
    Capability,
    ImageBackend,
    ScoringBackend,
    SpeechBackend,
    TranscriptionBackend,
)
from covey.protocol import (
    AudioChunk,
    KeyChunk,
    Paint,
    Progress,
    Score,
    Segment,
    Speak,
    SpeechChunk,
    Transcribe,
)
from covey.protocol.audio import transcript_digest
from covey.protocol.image import images_digest
from covey.protocol.score import scored_digest
from covey.protocol.wire import _Frame

UPLOAD_STALL = 30.0
"""Seconds a transcription waits for the next chunk of its audio before giving up."""


class MediaTasks:
    """Mixed into :class:`~covey.miner.agent.MinerAgent`: runs ``transcribe``, ``speak``
    and ``paint`` tasks on the backends that declare them."""

    _uploads: dict[str, asyncio.Queue[AudioChunk | KeyChunk]]
    _send: Callable[[ClientConnection, _Frame], Awaitable[None]]
    _send_soon: Callable[[ClientConnection, _Frame], None]
    _backend: Callable[[str, str | None, Capability], Backend]
    _signed: Callable[..., Any]

    async def _transcribe(self, ws: ClientConnection, task: Transcribe,
                          inbox: asyncio.Queue[AudioChunk | KeyChunk]) -> None:
        """Receive a transcription's audio, check it against the task's size and digest,
        and stream its segments, then ``transcribed`` with a signed receipt."""
        backend = self._backend(task.model, task.model_sha256, "transcribe")
        assert isinstance(backend, TranscriptionBackend)
        with tempfile.TemporaryDirectory(prefix="covey-audio-") as folder:
            path = Path(folder) / "upload"
            with path.open("wb") as out:
                await receive_upload(inbox, out, task.audio_bytes, task.audio_sha256, "file",
                                     "audio")
            self._uploads.pop(task.job_id, None)
            texts: list[str] = []
            gen = backend.transcribe(task, path)
            try:
                async for frame in gen:
                    if isinstance(frame, Segment):
                        texts.append(frame.text)
                    else:
                        frame = self._signed(task, frame, backend.offer.sha256,
                                             transcript_digest(texts))
                    await self._send(ws, frame)
            finally:
                await gen.aclose()

    async def _speak(self, ws: ClientConnection, task: Speak) -> None:
        """Stream a speech answer's audio, then ``spoken`` with a signed receipt over its
        bytes."""
        backend = self._backend(task.model, task.model_sha256, "speak")
        assert isinstance(backend, SpeechBackend)
        sent = hashlib.sha256()
        gen = backend.speak(task)
        try:
            async for frame in gen:
                if isinstance(frame, SpeechChunk):
                    sent.update(base64.b64decode(frame.data))
                else:
                    frame = self._signed(task, frame, backend.offer.sha256, sent.hexdigest())
                await self._send(ws, frame)
        finally:
            await gen.aclose()

    async def _paint(self, ws: ClientConnection, task: Paint) -> None:
        """Run a ``paint`` task and send its images with a signed receipt."""
        backend = self._backend(task.model, task.model_sha256, "paint")
        assert isinstance(backend, ImageBackend)
        reply = await backend.paint(task, self._progress(ws, task.job_id))
        await self._send(ws, self._signed(task, reply, backend.offer.sha256,
                                          images_digest(reply.images)))

    async def _score(self, ws: ClientConnection, task: Score,
                     inbox: asyncio.Queue[AudioChunk | KeyChunk]) -> None:
        """Run a ``score`` task (its evaluation keys first, when they follow it) and send
        ``scored`` with a signed receipt."""
        backend = self._backend(task.model, task.model_sha256, "score")
        assert isinstance(backend, ScoringBackend)
        keys = None
        if task.keys_bytes is not None and task.keys_sha256 is not None:
            buffer = io.BytesIO()
            await receive_upload(inbox, buffer, task.keys_bytes, task.keys_sha256,
                                 "encrypted", "evaluation keys")
            self._uploads.pop(task.job_id, None)
            keys = buffer.getvalue()
        reply = await backend.score(task, keys, self._progress(ws, task.job_id))
        await self._send(ws, self._signed(task, reply, backend.offer.sha256, scored_digest(
            reply.outputs, reply.encrypted, reply.proofs)))

    def _progress(self, ws: ClientConnection, job_id: str) -> Callable[[int], None]:
        """A backend's progress callback: each count becomes a ``progress`` frame (backends
        hand them over at most once a second, :func:`~covey.miner.backends.base.
        thread_reporter`)."""
        return lambda done: self._send_soon(ws, Progress(job_id=job_id, prefilled=done))


async def receive_upload(inbox: asyncio.Queue[AudioChunk | KeyChunk], out: BinaryIO,
                         total: int, sha256: str, param: str, what: str) -> None:
    """Write the ``total`` bytes that follow a task in chunk frames to ``out``, in order,
    checking them against ``sha256`` (``what`` names them in errors, ``param`` is the
    request field at fault).

    Raises:
        BackendError: ``invalid_value`` (param ``param``) for chunks out of order, more
            bytes than declared, or bytes whose size or SHA-256 is not the task's;
            ``upload_timeout`` when the next chunk does not come within
            :data:`UPLOAD_STALL` seconds.
    """
    digest = hashlib.sha256()
    size = 0
    seq = 0
    while size < total:
        try:
            async with asyncio.timeout(UPLOAD_STALL):
                chunk = await inbox.get()
        except TimeoutError:
            raise BackendError("upload_timeout", f"The {what} stopped after {size} of "
                               f"{total} bytes.", param) from None
        try:
            data = base64.b64decode(chunk.data, validate=True)
        except binascii.Error:
            data = b""
        size += len(data)
        if chunk.seq != seq or not data or size > total:
            raise BackendError("invalid_value", f"Chunk {chunk.seq} of the {what} is out "
                               "of place or over the declared size.", param)
        seq += 1
        digest.update(data)
        out.write(data)
    if digest.hexdigest() != sha256:
        raise BackendError("invalid_value", f"The {what} (as received) differ from the "
                           "SHA-256 declared with them." if what.endswith("s") else
                           f"The {what} does not match its SHA-256.", param)
