"""What the coordinator has measured of each miner: reputation, decode speed, latency.

Kept by miner id (the public key), so a miner that reconnects keeps its record for the life
of the coordinator process. Routing reads it; jobs write it when they end. Replicas share
every change, and a replica that starts takes a running one's records
(:mod:`covey.coordinator.shared`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

REPUTATION_START = 1.0
REPUTATION_MIN = 0.1
REPUTATION_MAX = 10.0
EWMA_ALPHA = 0.2
"""Weight of the newest sample in the moving averages: about the last ten jobs count."""
TTFT_MAX_S = 3600.0
"""The largest time to first token (seconds) taken from another replica."""
TPS_MAX = 1e6
"""The largest decode speed (tokens/s) taken from another replica."""


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
    """:class:`MinerScore` by miner id.

    Each change is also handed to ``listener`` (the replicas' shared reputation,
    :mod:`covey.coordinator.shared`), as an event another replica's scoreboard can
    :meth:`apply`: ``("ok", miner, ttft, decode_tps)``, ``("fail", miner)`` or ``("lift",
    miner, floor)``.
    """

    def __init__(self) -> None:
        self._scores: dict[str, MinerScore] = {}
        self.on_floor: tuple[float, Callable[[str], None]] | None = None
        """(floor, callback): the callback gets a miner id when a failure takes that
        miner's reputation from at or above the floor to below it."""
        self.listener: Callable[[tuple[Any, ...]], None] | None = None
        """Told of every change made here (not of those applied from elsewhere)."""

    def get(self, miner_id: str) -> MinerScore:
        """The record of ``miner_id`` (a fresh one if never seen)."""
        score = self._scores.get(miner_id)
        if score is None:
            score = self._scores[miner_id] = MinerScore()
        return score

    def success(self, miner_id: str, ttft: float | None, decode_tps: float | None) -> None:
        """A job finished well; ``ttft`` in seconds, ``decode_tps`` in tokens/s (None when
        not measurable, e.g. a one-token answer)."""
        self._success(miner_id, ttft, decode_tps)
        if self.listener is not None:
            self.listener(("ok", miner_id, ttft, decode_tps))

    def _success(self, miner_id: str, ttft: float | None, decode_tps: float | None) -> None:
        s = self.get(miner_id)
        s.reputation = next_reputation(s.reputation, False)
        s.succeeded += 1
        if ttft is not None:
            s.ttft = _ewma(s.ttft, ttft)
        if decode_tps is not None:
            s.decode_tps = _ewma(s.decode_tps, decode_tps)

    def failure(self, miner_id: str) -> None:
        """A job failed on the miner (disconnect, stall, error) or a check failed."""
        self._failure(miner_id)
        if self.listener is not None:
            self.listener(("fail", miner_id))

    def _failure(self, miner_id: str) -> None:
        s = self.get(miner_id)
        before = s.reputation
        s.reputation = next_reputation(s.reputation, True)
        s.failed += 1
        if self.on_floor is not None and s.reputation < self.on_floor[0] <= before:
            self.on_floor[1](miner_id)

    def lift(self, miner_id: str, floor: float) -> None:
        """Raise the miner's reputation to ``floor`` if it is below (it passed a trial
        again)."""
        self._lift(miner_id, floor)
        if self.listener is not None:
            self.listener(("lift", miner_id, floor))

    def _lift(self, miner_id: str, floor: float) -> None:
        s = self.get(miner_id)
        s.reputation = max(s.reputation, floor)

    @staticmethod
    def checked(event: Any) -> tuple[Any, ...]:
        """``event`` (see the class docstring) as :meth:`apply` takes it, once it is of a
        known shape with values in range: a miner id of 1 to 128 characters, a time to
        first token of 0 to :data:`TTFT_MAX_S` seconds, a decode speed of 0 to
        :data:`TPS_MAX` tokens/s (either may be None), a floor within [0.1, 10].

        Raises:
            ValueError: anything else.
        """
        match tuple(event) if isinstance(event, list | tuple) else None:
            case ("ok", str(miner), ttft, tps) if 0 < len(miner) <= 128:
                return ("ok", miner, _number(ttft, TTFT_MAX_S), _number(tps, TPS_MAX))
            case ("fail", str(miner)) if 0 < len(miner) <= 128:
                return ("fail", miner)
            case ("lift", str(miner), floor) if 0 < len(miner) <= 128:
                value = _number(floor, REPUTATION_MAX)
                if value is not None and value >= REPUTATION_MIN:
                    return ("lift", miner, value)
        raise ValueError(f"not a score event: {event!r}")

    def apply(self, event: tuple[Any, ...]) -> None:
        """A change another replica made, as :meth:`checked` returned it, as if made here."""
        match event:
            case ("ok", miner, ttft, tps):
                self._success(miner, ttft, tps)
            case ("fail", miner):
                self._failure(miner)
            case ("lift", miner, floor):
                self._lift(miner, floor)

    def snapshot(self, first: Sequence[str] = (), limit: int = 5000) -> dict[str, list[Any]]:
        """Up to ``limit`` records, those of the miners in ``first`` before the others, as
        JSON-ready lists (:meth:`restore` reads them)."""
        order = list(dict.fromkeys(m for m in first if m in self._scores))
        chosen = set(order)
        order += [m for m in self._scores if m not in chosen]
        return {m: [s.reputation, s.decode_tps, s.ttft, s.succeeded, s.failed]
                for m in order[:limit] for s in [self._scores[m]]}

    def restore(self, records: Any) -> None:
        """Take another replica's :meth:`snapshot` for the miners not measured here yet;
        records out of shape or range are skipped (counted in the error).

        Raises:
            ValueError: ``records`` is not a mapping, or some records were skipped.
        """
        if not isinstance(records, dict):
            raise ValueError("not a scoreboard")
        skipped = 0
        for miner, record in records.items():
            if miner in self._scores:
                continue
            try:
                r, tps, ttft, ok, failed = record
                reputation = _number(r, REPUTATION_MAX)
                if reputation is None or not all(
                        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**53
                        for n in (ok, failed)):
                    raise ValueError
                self._scores[miner] = MinerScore(
                    max(REPUTATION_MIN, reputation), _number(tps, TPS_MAX),
                    _number(ttft, TTFT_MAX_S), ok, failed)
            except (TypeError, ValueError):
                skipped += 1
        if skipped:
            raise ValueError(f"{skipped} of {len(records)} score records were out of shape")


def _number(x: object, most: float) -> float | None:
    """``x`` as a float within [0, ``most``], or None for None.

    Raises:
        ValueError: anything else (NaN and infinities included).
    """
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int | float) or not 0 <= x <= most:
        raise ValueError(f"not a number within [0, {most}]: {x!r}")
    return float(x)
