"""OpenAI's audio and image request bodies, Covey's scoring body, and the transcript formats.

``POST /v1/audio/speech`` (:class:`SpeechRequest`), ``POST /v1/images/generations``
(:class:`ImageRequest`), Covey's own ``POST /v1/scores`` (:class:`ScoreRequest`); a
transcription's multipart form is read by the route, and its answer rendered by
:func:`render_transcript` as ``json``, ``text``, ``srt``, ``vtt`` or ``verbose_json`` (the
shapes of OpenAI's whisper-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from covey.protocol.audio import MAX_SPEECH_CHARS, Segment, SpeechFormat
from covey.protocol.image import MAX_IMAGES
from covey.protocol.openai import _Request
from covey.protocol.score import MAX_ROWS

TranscriptFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]

SPEECH_MEDIA_TYPES: dict[str, str] = {
    "mp3": "audio/mpeg", "opus": "audio/ogg", "wav": "audio/wav", "flac": "audio/flac",
    "pcm": "audio/pcm",
}


class SpeechRequest(_Request):
    """``POST /v1/audio/speech`` body; ``seed`` (Covey's own) fixes the voice's noise, so
    the same seed reads a text the same way."""

    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=MAX_SPEECH_CHARS)
    voice: str = Field(min_length=1, max_length=100)
    response_format: SpeechFormat = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: Literal["audio"] = "audio"
    seed: int | None = Field(default=None, ge=0, lt=2**63)


class ImageRequest(_Request):
    """``POST /v1/images/generations`` body; images come back as ``b64_json`` (a network
    of miners keeps no files to link to). ``seed`` (Covey's own) fixes image ``i`` to seed
    ``seed + i``; ``steps`` sets the denoising steps."""

    model: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(default=None, max_length=20)
    response_format: Literal["b64_json", "url"] | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**32)
    steps: int | None = Field(default=None, ge=1, le=200)


def usage(seconds: int) -> dict[str, object]:
    """A transcription's ``usage``: seconds of audio, as OpenAI reports for whisper."""
    return {"type": "duration", "seconds": seconds}


def render_transcript(fmt: TranscriptFormat, segments: Sequence[Segment], language: str,
                      duration: float, seconds: int, words: bool
                      ) -> tuple[str | dict[str, object], str]:
    """(body, media type) of a finished transcription in ``fmt``: a JSON object for
    ``json`` and ``verbose_json``, text otherwise. ``words`` adds the words' timestamps to
    ``verbose_json``."""
    text = "".join(s.text for s in segments).strip()
    if fmt == "json":
        return {"text": text, "usage": usage(seconds)}, "application/json"
    if fmt == "text":
        return text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return _cues(segments, ",", numbered=True), "text/plain; charset=utf-8"
    if fmt == "vtt":
        return "WEBVTT\n\n" + _cues(segments, ".", numbered=False), "text/vtt; charset=utf-8"
    body: dict[str, object] = {
        "task": "transcribe", "language": language, "duration": round(duration, 3),
        "text": text, "usage": usage(seconds),
        "segments": [{"id": s.id, "seek": int(s.start * 100), "start": s.start, "end": s.end,
                      "text": s.text, "tokens": list(s.tokens), "temperature": 0.0,
                      "avg_logprob": s.avg_logprob,
                      "compression_ratio": s.compression_ratio,
                      "no_speech_prob": s.no_speech_prob} for s in segments],
    }
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end}
                         for s in segments for w in s.words or ()]
    return body, "application/json"


def _cues(segments: Sequence[Segment], comma: str, numbered: bool) -> str:
    out = []
    for n, s in enumerate(segments, 1):
        head = f"{n}\n" if numbered else ""
        out.append(f"{head}{_stamp(s.start, comma)} --> {_stamp(s.end, comma)}\n"
                   f"{s.text.strip()}\n")
    return "\n".join(out)


def _stamp(seconds: float, comma: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{comma}{ms:03d}"


class EncryptedRow(_Request):
    """An encrypted scoring row: ``ciphertext`` (base64 of a serialized TenSEAL CKKS
    vector) made under the registered evaluation keys ``keys_sha256``."""

    ciphertext: str = Field(min_length=1, max_length=2**24,
                            pattern=r"^[A-Za-z0-9+/]*={0,2}$")
    keys_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ScoreRequest(_Request):
    """``POST /v1/scores`` body (Covey's own): ``inputs``, rows of the model's features in
    the order ``GET /v1/models/{id}`` lists them (numbers only: a string is refused, not
    read as a number), or one ``encrypted`` row; ``proof`` asks for a zero-knowledge proof
    per row."""

    model: str = Field(min_length=1)
    inputs: list[list[float]] | None = Field(default=None, min_length=1,
                                             max_length=MAX_ROWS, strict=True)
    proof: bool = False
    encrypted: EncryptedRow | None = None
    user: str | None = None
