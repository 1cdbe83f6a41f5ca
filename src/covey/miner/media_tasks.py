"""The miner agent's part for media tasks: transcription, speech and images.

A transcription's audio follows its task in ``audio_chunk`` frames, gathered into a
temporary file and checked against the task's declared size and SHA-256 before the backend
reads it; segments and audio chunks go out as the backend makes them; every task ends with
its final frame carrying the miner's signed receipt (:meth:`MinerAgent._signed
<covey.miner.agent.MinerAgent._signed>`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection

from covey.miner.backends.base import (
    Backend,
    BackendError,
    Capability,
    ImageBackend,
    SpeechBackend,
    TranscriptionBackend,
)
from covey.protocol import (
    AudioChunk,
    Paint,
    Progress,
    Segment,
    Speak,
    SpeechChunk,
    Transcribe,
)
from covey.protocol.audio import transcript_digest
from covey.protocol.image import images_digest
from covey.protocol.wire import _Frame

UPLOAD_STALL = 30.0
"""Seconds a transcription waits for the next chunk of its audio before giving up."""


class MediaTasks:
    """Mixed into :class:`~covey.miner.agent.MinerAgent`: runs ``transcribe``, ``speak``
    and ``paint`` tasks on the backends that declare them."""

    _uploads: dict[str, asyncio.Queue[AudioChunk]]
    _send: Callable[[ClientConnection, _Frame], Awaitable[None]]
    _send_soon: Callable[[ClientConnection, _Frame], None]
    _backend: Callable[[str, str | None, Capability], Backend]
    _signed: Callable[..., Any]

    async def _transcribe(self, ws: ClientConnection, task: Transcribe,
                          inbox: asyncio.Queue[AudioChunk]) -> None:
        """Receive a transcription's audio, check it against the task's size and digest,
        and stream its segments, then ``transcribed`` with a signed receipt."""
        backend = self._backend(task.model, task.model_sha256, "transcribe")
        assert isinstance(backend, TranscriptionBackend)
        with tempfile.TemporaryDirectory(prefix="covey-audio-") as folder:
            path = Path(folder) / "upload"
            await receive_upload(task, inbox, path)
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

    def _progress(self, ws: ClientConnection, job_id: str) -> Callable[[int], None]:
        """A backend's progress callback: each count becomes a ``progress`` frame (backends
        hand them over at most once a second, :func:`~covey.miner.backends.base.
        thread_reporter`)."""
        return lambda done: self._send_soon(ws, Progress(job_id=job_id, prefilled=done))


async def receive_upload(task: Transcribe, inbox: asyncio.Queue[AudioChunk],
                         path: Path) -> None:
    """Write the task's audio chunks to ``path`` in order.

    Raises:
        BackendError: ``invalid_value`` (param ``file``) for chunks out of order, more
            bytes than declared, or audio whose size or SHA-256 is not the task's;
            ``upload_timeout`` when the next chunk does not come within
            :data:`UPLOAD_STALL` seconds.
    """
    digest = hashlib.sha256()
    size = 0
    seq = 0
    with path.open("wb") as out:
        while size < task.audio_bytes:
            try:
                async with asyncio.timeout(UPLOAD_STALL):
                    chunk = await inbox.get()
            except TimeoutError:
                raise BackendError("upload_timeout", f"The audio stopped after {size} of "
                                   f"{task.audio_bytes} bytes.", "file") from None
            try:
                data = base64.b64decode(chunk.data, validate=True)
            except binascii.Error:
                data = b""
            size += len(data)
            if chunk.seq != seq or not data or size > task.audio_bytes:
                raise BackendError("invalid_value", f"Audio chunk {chunk.seq} is out of "
                                   "place or over the declared size.", "file")
            seq += 1
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != task.audio_sha256:
        raise BackendError("invalid_value", "The audio does not match its SHA-256.", "file")
