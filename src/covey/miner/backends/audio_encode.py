"""Encoding synthesized speech as it is made, for each of OpenAI's speech formats.

An :class:`Encoder` takes float32 mono samples sentence by sentence and returns the file's
next bytes, so a speech answer streams while it is synthesized:

- ``pcm``: raw 16-bit little-endian samples;
- ``wav``: a 44-byte RIFF header whose sizes say "unknown" (0xFFFFFFFF, as streaming
  servers send it; libsndfile and ffmpeg read to the end), then the samples;
- ``mp3``: MPEG layer III from libmp3lame through PyAV, on an unseekable sink so no header
  is rewritten afterwards;
- ``opus``: Ogg Opus through libsndfile (pages flush as they fill);
- ``flac``: written whole when the speech ends, because its header carries the length and
  libsndfile cannot read a FLAC stream that leaves it out.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from covey.protocol.audio import SpeechFormat


class _Pipe(io.RawIOBase):
    """An unseekable sink collecting what an encoder writes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.chunks.append(bytes(data))
        return len(self.chunks[-1])

    def take(self) -> bytes:
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out


class Encoder:
    """Encodes float32 samples in [-1, 1] at ``sample_rate`` Hz as ``fmt``.

    :meth:`add` returns the bytes ready so far (possibly empty), :meth:`finish` the rest.
    """

    def __init__(self, fmt: SpeechFormat, sample_rate: int) -> None:
        self.fmt = fmt
        self.sample_rate = sample_rate
        self._started = False
        self._whole: list[np.ndarray] = []
        self._pipe = _Pipe()
        self._av: Any = None
        self._stream: Any = None
        self._sf: Any = None
        self._buffer: io.BytesIO | None = None
        self._sent = 0

    def add(self, samples: np.ndarray) -> bytes:
        """Encode ``samples`` (1-D float32); the file's next bytes."""
        samples = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
        match self.fmt:
            case "pcm":
                return _int16(samples)
            case "wav":
                head = b"" if self._started else _wav_header(self.sample_rate)
                self._started = True
                return head + _int16(samples)
            case "flac":
                self._whole.append(samples)
                return b""
            case "mp3":
                return self._mp3(samples)
            case "opus":
                return self._opus(samples)
        raise ValueError(f"unknown format {self.fmt}")  # pragma: no cover - closed Literal

    def finish(self) -> bytes:
        """The file's remaining bytes (an encoder's last frames, or a whole FLAC)."""
        match self.fmt:
            case "flac":
                import soundfile as sf

                out = io.BytesIO()
                joined = np.concatenate(self._whole) if self._whole else np.zeros(0, np.float32)
                sf.write(out, joined, self.sample_rate, format="FLAC", subtype="PCM_16")
                return out.getvalue()
            case "mp3":
                if self._av is None:
                    self._mp3(np.zeros(0, np.float32))
                for packet in self._stream.encode(None):
                    self._av.mux(packet)
                self._av.close()
                return self._pipe.take()
            case "opus":
                if self._sf is None:
                    self._opus(np.zeros(0, np.float32))
                self._sf.close()
                return self._drain()
        return b""

    def _mp3(self, samples: np.ndarray) -> bytes:
        import av

        if self._av is None:
            self._av = av.open(self._pipe, "w", format="mp3")
            self._stream = self._av.add_stream("libmp3lame", rate=self.sample_rate,
                                               layout="mono")
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="flt", layout="mono")
            frame.sample_rate = self.sample_rate
            for packet in self._stream.encode(frame):
                self._av.mux(packet)
        return self._pipe.take()

    def _opus(self, samples: np.ndarray) -> bytes:
        import soundfile as sf

        if self._sf is None:
            self._buffer = io.BytesIO()
            # Opus runs at 48 kHz; libsndfile resamples other rates on write.
            self._sf = sf.SoundFile(self._buffer, "w", self.sample_rate, 1, format="OGG",
                                    subtype="OPUS")
        if samples.size:
            self._sf.write(samples)
        return self._drain()

    def _drain(self) -> bytes:
        assert self._buffer is not None
        view = self._buffer.getbuffer()
        out = view[self._sent:].tobytes()
        self._sent = len(view)
        del view
        return out


def _int16(samples: np.ndarray) -> bytes:
    return (samples * 32767.0).round().astype("<i2").tobytes()


def _wav_header(sample_rate: int) -> bytes:
    """A PCM 16-bit mono RIFF/WAVE header with unknown sizes (0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))
