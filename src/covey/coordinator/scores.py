"""What the coordinator has measured of each miner: reputation, decode speed, latency.

Kept by miner id (the public key), so a miner that reconnects keeps its record for the life
of the coordinator process. Routing reads it; jobs write it when they end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

REPUTATION_START = 1.0
REPUTATION_MIN = 0.1
REPUTATION_MAX = 10.0
EWMA_ALPHA = 0.2
"""Weight of the newest sample in the moving averages: about the last ten jobs count."""


def next_reputation(r: float, failed: bool) -> float:
    """R′ = R·0.8^M·1.01^(1−M), clipped to [0.1, 10]; M = 1 for a failed job (error,
    disconnect, stall or failed check), else 0.

    One failure costs what about 22 successes earn back, so a flaky miner sinks fast and an
    honest one recovers steadily (the rule of the network's Trust design, DESIGN.md).
    """
    r = r * 0.8 if failed else r * 1.01
    return min(REPUTATION_MAX, max(REPUTATION_MIN, r))


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else old + EWMA_ALPHA * (sample - old)


@dataclass
class MinerScore:
    """One miner's record: ``reputation`` (dimensionless, starts at 1), ``decode_tps``
    (tokens per second per job) and ``ttft`` (seconds from dispatch to first token) as
    moving averages (None until measured), and job counts."""

    reputation: float = REPUTATION_START
    decode_tps: float | None = None
    ttft: float | None = None
    succeeded: int = 0
    failed: int = 0

    def expected_seconds(self, tokens: int = 128) -> float | None:
        """Expected time to serve a ``tokens``-token answer, or None before any measure."""
        if self.decode_tps is None or self.ttft is None:
            return None
        return self.ttft + tokens / max(self.decode_tps, 1e-3)


class Scoreboard:
    """:class:`MinerScore` by miner id."""

    def __init__(self) -> None:
        self._scores: dict[str, MinerScore] = {}
        self.on_floor: tuple[float, Callable[[str], None]] | None = None
        """(floor, callback): the callback gets a miner id when a failure takes that
        miner's reputation from at or above the floor to below it."""

    def get(self, miner_id: str) -> MinerScore:
        """The record of ``miner_id`` (a fresh one if never seen)."""
        score = self._scores.get(miner_id)
        if score is None:
            score = self._scores[miner_id] = MinerScore()
        return score

    def success(self, miner_id: str, ttft: float | None, decode_tps: float | None) -> None:
        """A job finished well; ``ttft`` in seconds, ``decode_tps`` in tokens/s (None when
        not measurable, e.g. a one-token answer)."""
        s = self.get(miner_id)
        s.reputation = next_reputation(s.reputation, False)
        s.succeeded += 1
        if ttft is not None:
            s.ttft = _ewma(s.ttft, ttft)
        if decode_tps is not None:
            s.decode_tps = _ewma(s.decode_tps, decode_tps)

    def failure(self, miner_id: str) -> None:
        """A job failed on the miner (disconnect, stall, error) or a check failed."""
        s = self.get(miner_id)
        before = s.reputation
        s.reputation = next_reputation(s.reputation, True)
        s.failed += 1
        if self.on_floor is not None and s.reputation < self.on_floor[0] <= before:
            self.on_floor[1](miner_id)
