"""TEST ONLY: cheating media miners, to prove that verification catches them.

Enabled, like :mod:`covey.miner.backends.adversary`, solely by ``COVEY_TEST_ADVERSARY``
(and ``COVEY_TEST_ADVERSARY_HONEST_FIRST=N`` to answer the first N tasks honestly):

- transcription, ``wrong-transcript``: every segment's text replaced by other words (the
  times and usage stay true);
- speech, ``silence`` or ``noise``: the audio replaced by silence or white noise of the same
  length and format;
- images, ``random-image``: each image replaced by random pixels of the same size;
- scoring, ``wrong-score``: each plain score moved by 0.3 (kept in [0, 1]); ``false-proof``:
  each proof's bytes altered (the score stays the honest one).

Other behaviours leave a media backend honest.
"""

from __future__ import annotations

import base64
import io
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from covey.miner.backends.adversary import HONEST_FIRST_ENV
from covey.miner.backends.audio_encode import Encoder
from covey.miner.backends.base import (
    Backend,
    ImageBackend,
    ScoringBackend,
    SpeechBackend,
    TranscriptionBackend,
)
from covey.protocol import (
    Paint,
    Painted,
    Score,
    Scored,
    Segment,
    Speak,
    SpeechChunk,
    Spoken,
    Transcribe,
)
from covey.protocol.audio import AUDIO_CHUNK_BYTES, Transcribed

_WORDS = ("banana", "orbit", "violet", "tractor", "seven", "harbor", "quietly", "marble")


class _Honesty:
    def __init__(self) -> None:
        self._honest_left = int(os.environ.get(HONEST_FIRST_ENV, "0"))

    def cheat_now(self) -> bool:
        self._honest_left -= 1
        return self._honest_left < 0


class AdversaryTranscription(TranscriptionBackend):
    """``wrong-transcript``: made-up words in place of the heard ones."""

    def __init__(self, inner: TranscriptionBackend, behaviour: str) -> None:
        self.inner, self.offer, self.slots = inner, inner.offer, inner.slots
        self.cheat = behaviour == "wrong-transcript"
        self._honesty = _Honesty()
        self._rng = random.Random()

    def close(self) -> None:
        self.inner.close()

    async def transcribe(self, task: Transcribe, audio: Path
                         ) -> AsyncIterator[Segment | Transcribed]:
        cheat = self.cheat and self._honesty.cheat_now()
        async for frame in self.inner.transcribe(task, audio):
            if cheat and isinstance(frame, Segment):
                words = " ".join(self._rng.choice(_WORDS) for _ in frame.text.split())
                frame = frame.model_copy(update={"text": " " + words, "tokens": (),
                                                 "words": None})
            yield frame


class AdversarySpeech(SpeechBackend):
    """``silence`` / ``noise``: audio of the right length and format that says nothing."""

    def __init__(self, inner: SpeechBackend, behaviour: str) -> None:
        self.inner, self.offer, self.slots = inner, inner.offer, inner.slots
        self.behaviour = behaviour if behaviour in ("silence", "noise") else None
        self._honesty = _Honesty()

    def close(self) -> None:
        self.inner.close()

    async def speak(self, task: Speak) -> AsyncIterator[SpeechChunk | Spoken]:
        cheat = self.behaviour is not None and self._honesty.cheat_now()
        spoken: Spoken | None = None
        async for frame in self.inner.speak(task):
            if not cheat:
                yield frame
            elif isinstance(frame, Spoken):
                spoken = frame
        if spoken is None:
            return
        import numpy as np

        samples = round(spoken.duration * spoken.sample_rate)
        fake = (np.zeros(samples, np.float32) if self.behaviour == "silence" else
                np.random.default_rng().uniform(-0.5, 0.5, samples).astype(np.float32))
        encoder = Encoder(task.response_format, spoken.sample_rate)
        data = encoder.add(fake) + encoder.finish()
        for i in range(0, len(data), AUDIO_CHUNK_BYTES):
            yield SpeechChunk(job_id=task.job_id,
                              data=base64.b64encode(data[i:i + AUDIO_CHUNK_BYTES]).decode())
        yield spoken


class AdversaryImage(ImageBackend):
    """``random-image``: random pixels of the right size in place of each image."""

    def __init__(self, inner: ImageBackend, behaviour: str) -> None:
        self.inner, self.offer, self.slots = inner, inner.offer, inner.slots
        self.cheat = behaviour == "random-image"
        self._honesty = _Honesty()

    def close(self) -> None:
        self.inner.close()

    async def paint(self, task: Paint, progress: Callable[[int], None] | None = None
                    ) -> Painted:
        honest = await self.inner.paint(task, progress)
        if not (self.cheat and self._honesty.cheat_now()):
            return honest
        import numpy as np
        from PIL import Image

        images = []
        for _ in range(task.n):
            pixels = np.random.default_rng().integers(0, 256, (task.height, task.width, 3),
                                                      dtype=np.uint8)
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="PNG")
            images.append(base64.b64encode(out.getvalue()).decode())
        return honest.model_copy(update={"images": tuple(images)})


class AdversaryScoring(ScoringBackend):
    """``wrong-score``: plain scores moved by 0.3; ``false-proof``: proofs altered."""

    def __init__(self, inner: ScoringBackend, behaviour: str) -> None:
        self.inner, self.offer, self.slots = inner, inner.offer, inner.slots
        self.behaviour = behaviour
        self._honesty = _Honesty()

    def close(self) -> None:
        self.inner.close()

    async def score(self, task: Score, keys: bytes | None = None,
                    progress: Callable[[int], None] | None = None) -> Scored:
        reply = await self.inner.score(task, keys, progress)
        if not self._honesty.cheat_now():
            return reply
        if self.behaviour == "wrong-score" and reply.outputs is not None:
            moved = tuple(x - 0.3 if x > 0.5 else x + 0.3 for x in reply.outputs)
            return reply.model_copy(update={"outputs": moved})
        if self.behaviour == "false-proof" and reply.proofs:
            return reply.model_copy(update={"proofs": tuple(_tamper(p) for p in reply.proofs)})
        return reply


def _tamper(proof: str) -> str:
    """``proof`` (ezkl's JSON) with one hex digit of its proof bytes changed."""
    import json

    body = json.loads(proof)
    raw = body.get("proof")
    if isinstance(raw, str) and len(raw) > 80:
        i = 70
        body["proof"] = raw[:i] + ("1" if raw[i] != "1" else "2") + raw[i + 1:]
    elif isinstance(raw, list) and raw:
        body["proof"] = [(raw[0] + 1) % 256, *raw[1:]]
    return json.dumps(body)


def wrap(served: Backend, behaviour: str) -> Backend | None:
    """``served`` wrapped in its kind's adversary, or None when it is not a media or
    scoring backend."""
    if isinstance(served, ScoringBackend):
        return AdversaryScoring(served, behaviour)
    if isinstance(served, TranscriptionBackend):
        return AdversaryTranscription(served, behaviour)
    if isinstance(served, SpeechBackend):
        return AdversarySpeech(served, behaviour)
    if isinstance(served, ImageBackend):
        return AdversaryImage(served, behaviour)
    return None
