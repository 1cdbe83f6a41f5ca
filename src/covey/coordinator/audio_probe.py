"""How long an uploaded audio file lasts, read by PyAV (FFmpeg) before any miner sees it.

The escrow of a transcription holds the cost of the file's whole duration, so the duration
must be known up front. The container's header gives it for most formats; otherwise the
packets' durations are summed (demuxing only, nothing is decoded). A header may understate
the length: the task then carries the probed bound (``Transcribe.max_seconds``) and the
miner decodes no further. Probing a large file takes seconds: call it off the event loop.
"""

from __future__ import annotations

import io
import math

MAX_PROBE_SECONDS = 2 * 3600
"""Longest audio accepted (2 h, what a miner decodes at most)."""


class NotAudio(ValueError):
    """The bytes are not a media file with an audio stream FFmpeg can read."""


def audio_seconds(data: bytes) -> float:
    """Duration of the audio in ``data``, in seconds.

    Raises:
        NotAudio: empty, unreadable, without an audio stream, of no length, or longer
            than :data:`MAX_PROBE_SECONDS`.
    """
    if not data:
        raise NotAudio("the file is empty")
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise NotAudio("the file has no audio stream")
            stream = streams[0]
            seconds = 0.0
            if container.duration is not None and container.duration > 0:
                seconds = container.duration / av.time_base
            elif stream.duration is not None and stream.time_base is not None:
                seconds = float(stream.duration * stream.time_base)
            else:
                for packet in container.demux(stream):
                    if packet.duration is not None and packet.time_base is not None:
                        seconds += float(packet.duration * packet.time_base)
                    if seconds > MAX_PROBE_SECONDS:
                        break
    except NotAudio:
        raise
    except (av.error.FFmpegError, ValueError, OSError, IndexError) as exc:
        raise NotAudio(f"FFmpeg cannot read it ({type(exc).__name__})") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise NotAudio("the file holds no audio")
    if seconds > MAX_PROBE_SECONDS:
        raise NotAudio(f"it lasts over {MAX_PROBE_SECONDS // 3600} hours, the most one "
                       "request may transcribe")
    return seconds
