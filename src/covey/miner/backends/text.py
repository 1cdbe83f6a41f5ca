"""Grouping token deltas into frames (:class:`DeltaBuffer`).

The incremental detokenizer with stop strings, :class:`~covey.protocol.text.StreamDecoder`,
lives in :mod:`covey.protocol.text` since clients of private models need it too; it is
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from covey.protocol.text import StreamDecoder

__all__ = ["DeltaBuffer", "StreamDecoder"]


class DeltaBuffer:
    """Groups tokens into ``delta`` frames at most every ``interval`` seconds.

    The first token goes out at once (time to first token is untouched); later ones are
    batched, so the miner, the coordinator and the client wake once per frame, not once per
    token. On a machine whose cores all run the model, every wake-up preempts a decode
    thread, so fewer frames mean faster decoding (vLLM's ``--stream-interval`` has the same
    purpose). ``emit(text, token_ids)`` is called for each frame; ``clock`` is in seconds.
    """

    def __init__(self, interval: float, emit: Callable[[str, tuple[int, ...]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._emit = emit
        self._clock = clock
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._last: float | None = None

    def add(self, text: str, token_id: int | None = None) -> None:
        """Queue one token's text (and id); send the frame if the interval has passed."""
        self._texts.append(text)
        if token_id is not None:
            self._ids.append(token_id)
        now = self._clock()
        if self._last is None or now - self._last >= self._interval:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Send whatever is queued, if anything."""
        if self._ids or any(self._texts):
            self._emit("".join(self._texts), tuple(self._ids))
            self._last = self._clock() if now is None else now
        self._texts.clear()
        self._ids.clear()
