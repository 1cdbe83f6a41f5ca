"""The audio tasks: transcription (speech → text) and speech (text → speech).

Transcription: ``transcribe`` (the task, declaring the upload's size and SHA-256), then the
audio itself in ``audio_chunk`` frames of at most :data:`AUDIO_CHUNK_BYTES` (so no frame
grows with the upload), answered by ``segment``* → ``transcribed`` | ``error``. Usage is
in whole seconds of audio transcribed (rounded up), what the request is billed for.

Speech: ``speak`` → ``speech_chunk``* → ``spoken`` | ``error``; the chunks are the encoded
audio file in order (``response_format``), streamed as sentences are synthesized. Usage is
in input characters.

Receipts: a transcription's ``request_sha256`` covers the task, hence the audio's digest;
its ``output_sha256`` is :func:`transcript_digest` of the segments' text. A speech's
``output_sha256`` is the SHA-256 of the audio bytes sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal

from pydantic import Field

from covey.protocol.wire import Base64, JobId, Receipt, Sha256Hex, _Frame

AUDIO_CHUNK_BYTES = 256 * 1024
"""Largest audio payload of one ``audio_chunk`` / ``speech_chunk`` frame (bytes, before
base64)."""
MAX_AUDIO_BYTES = 2**30
"""Hard ceiling on a declared upload (1 GiB); coordinators cap far lower (25 MB default)."""
MAX_SPEECH_CHARS = 4096
"""Longest speech input in characters, as OpenAI's ``/v1/audio/speech``."""

SpeechFormat = Literal["wav", "mp3", "opus", "flac", "pcm"]
"""Audio encodings of a speech answer (OpenAI's names; ``pcm`` is raw 16-bit little-endian
mono at the model's sample rate, 24 kHz for the bundled voice)."""


class Transcribe(_Frame):
    """Task: transcribe the audio that follows in ``audio_chunk`` frames.

    ``audio_bytes`` / ``audio_sha256`` describe the whole upload (the miner refuses audio of
    another size or digest); ``filename`` is the client's name for it (a decoding hint);
    ``language`` an ISO-639-1 code or None to detect; ``prompt`` text that primes the
    decoder; ``temperature`` 0 is greedy (deterministic, what re-checks rely on); ``words``
    asks for word timestamps; ``offset`` (seconds) skips audio already transcribed by a
    miner that failed (a failover resumes there).
    """

    type: Literal["transcribe"] = "transcribe"
    job_id: JobId
    model: str
    model_sha256: Sha256Hex | None = None
    audio_bytes: int = Field(ge=1, le=MAX_AUDIO_BYTES)
    audio_sha256: Sha256Hex
    filename: str | None = Field(default=None, max_length=255)
    language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}$")
    prompt: str | None = Field(default=None, max_length=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    words: bool = False
    offset: float = Field(default=0.0, ge=0.0)
    max_seconds: int | None = Field(default=None, ge=1)
    """The most seconds of audio the request paid for (its escrow's bound, from the file's
    declared duration): the miner decodes no further and bills at most this, so a file
    whose header understates its length gets the length it declared transcribed."""


class AudioChunk(_Frame):
    """Coordinator → miner: bytes ``seq`` (0, 1, …) of a ``transcribe`` task's audio."""

    type: Literal["audio_chunk"] = "audio_chunk"
    job_id: JobId
    seq: int = Field(ge=0)
    data: Base64 = Field(max_length=(AUDIO_CHUNK_BYTES // 3 + 1) * 4)


class Word(_Frame):
    """One word with its time span (seconds from the start of the audio)."""

    word: str = Field(max_length=1000)
    start: float
    end: float
    probability: float = Field(ge=0.0, le=1.0)


class Segment(_Frame):
    """One decoded stretch of speech, sent as soon as it is decoded.

    ``id`` counts from 0 over the whole audio; times are seconds from its start; ``tokens``
    the decoder's token ids; ``avg_logprob``, ``compression_ratio`` and ``no_speech_prob`` as
    in OpenAI's ``verbose_json``; ``words`` when the task asked for them.
    """

    type: Literal["segment"] = "segment"
    job_id: JobId
    id: int = Field(ge=0)
    start: float = Field(ge=0.0)
    end: float = Field(ge=0.0)
    text: str = Field(max_length=2**16)
    tokens: tuple[int, ...] = Field(default=(), max_length=2**12)
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = Field(default=0.0, ge=0.0, le=1.0)
    words: tuple[Word, ...] | None = Field(default=None, max_length=2**12)


class Transcribed(_Frame):
    """The end of a transcription: ``language`` detected (or given), ``duration`` of the
    whole audio in seconds, and ``seconds``, the billed usage: the audio this miner
    transcribed (from the task's ``offset``), rounded up to whole seconds. ``receipt``
    (``prompt_tokens`` holds ``seconds``) and ``signature`` are added by the agent."""

    type: Literal["transcribed"] = "transcribed"
    job_id: JobId
    language: str = Field(max_length=20)
    duration: float = Field(ge=0.0)
    seconds: int = Field(ge=0)
    receipt: Receipt | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


class Speak(_Frame):
    """Task: read ``input`` aloud in ``voice`` at ``speed`` (0.25–4.0, 1 is the voice's
    pace), encoded as ``response_format``. ``seed`` fixes the synthesis noise, so the same
    seed gives the same audio (re-checks and trials set it)."""

    type: Literal["speak"] = "speak"
    job_id: JobId
    model: str
    model_sha256: Sha256Hex | None = None
    input: str = Field(min_length=1, max_length=MAX_SPEECH_CHARS)
    voice: str = Field(min_length=1, max_length=100)
    response_format: SpeechFormat = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class SpeechChunk(_Frame):
    """The next bytes of a speech answer's audio file."""

    type: Literal["speech_chunk"] = "speech_chunk"
    job_id: JobId
    data: Base64 = Field(max_length=(AUDIO_CHUNK_BYTES // 3 + 1) * 4)


class Spoken(_Frame):
    """The end of a speech answer: ``characters`` billed (the input's length), the audio's
    ``duration`` in seconds and ``sample_rate`` in Hz. ``receipt`` (``prompt_tokens`` holds
    ``characters``; ``output_sha256`` the SHA-256 of the audio bytes) and ``signature`` are
    added by the agent."""

    type: Literal["spoken"] = "spoken"
    job_id: JobId
    characters: int = Field(ge=0)
    duration: float = Field(ge=0.0)
    sample_rate: int = Field(ge=1, le=384_000)
    receipt: Receipt | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


def transcript_digest(texts: Iterable[str]) -> str:
    """SHA-256 (hex) of the segments' texts, concatenated as sent: a transcription
    receipt's ``output_sha256``."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    return digest.hexdigest()
