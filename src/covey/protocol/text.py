"""Turning a stream of token bytes into safe text: shared by miners (which stream text
deltas) and clients of private models (which turn the ids a miner streams back into text).

Two things are held back until they resolve: the first bytes of a UTF-8 character split
across tokens (byte-level BPE splits emoji and CJK this way), so no delta ever carries U+FFFD
for a character that is merely incomplete; and text that could be the start of a stop string,
so a stop string never leaks to the client before it is recognised. llama.cpp's own server
does the same two checks (``validate_utf8`` and partial stop matching in ``server.cpp``).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Incremental detokenizer with stop strings.

    ``feed(piece)`` takes the bytes of one token and returns the text now safe to emit;
    ``stopped`` turns true once a stop string is seen (the text before it has been
    returned, the stop string itself never is); ``finish()`` returns whatever is still held
    back at the end of generation, dropping the bytes of an unfinished character.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._pending = ""
        self._skip = 0
        self.stopped = False

    def replay(self, pieces: Iterable[bytes], text_chars: int) -> None:
        """Resume after another run: feed the bytes of the tokens it generated, emitting
        nothing, and from then on drop the first characters until ``text_chars`` in all
        (what the client already received) have been passed over.

        The decoder is deterministic, so after the replay its held-back state is the one the
        first run had; only text the first run had not yet sent comes out.
        """
        emitted = sum(len(self.feed(piece)) for piece in pieces)
        self._skip = max(0, text_chars - emitted)

    def _skipped(self, text: str) -> str:
        if self._skip and text:
            n = min(self._skip, len(text))
            self._skip -= n
            return text[n:]
        return text

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return newly emittable text (may be empty)."""
        return self._skipped(self._feed(piece))

    def _feed(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self._pending += self._utf8.decode(piece)
        if not self._stop:
            out, self._pending = self._pending, ""
            return out
        cut = self._first_stop(self._pending)
        if cut is not None:
            out = self._pending[:cut]
            self._pending = ""
            self.stopped = True
            return out
        keep = self._partial_stop_len(self._pending)
        split = len(self._pending) - keep
        out, self._pending = self._pending[:split], self._pending[split:]
        return out

    def finish(self) -> str:
        """Return held-back text at the end of generation (incomplete bytes are dropped)."""
        if self.stopped:
            return ""
        out, self._pending = self._pending, ""
        self._utf8.reset()
        return self._skipped(out)

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
