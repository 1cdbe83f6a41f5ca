"""Placement of a sharded model: which miners form a chain, and which blocks are missing.

Pure functions of the shard miners a coordinator knows (no I/O), so the rules are
unit-tested without a network (``tests/test_placement.py``), as exo's
``master/placement.py`` is.

- :func:`plan_chain` picks the chain a request runs on: the cheapest path through the
  model's blocks, where a step on a miner costs a relay hop plus its measured time per
  block for each block it runs, scaled up by the sessions it is already running (so
  concurrent requests spread over parallel chains). A miner may run part of the range it
  holds, so overlapping ranges chain too (Petals' servers do the same with spans).
- :func:`missing_blocks` says what no live miner holds: the model is then *incomplete*.
- :func:`suggest_range` and :func:`rebalance` close gaps: where a new miner, or one whose
  blocks others also hold, should load blocks (Petals' ``choose_best_blocks``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HOP_SECONDS = 0.002
"""What one relay hop costs in a plan, in seconds (the coordinator's target per hop at
p50, ``bench/shards.py``): a shorter chain wins over a longer one of equal speed."""
DEFAULT_BLOCK_SECONDS = 0.002
"""Seconds per block per token assumed for a miner not yet measured (SmolLM2-135M on
one CPU thread runs its 30 blocks at about 17 tokens/s: 2 ms a block)."""


@dataclass(frozen=True)
class ShardMiner:
    """A live miner holding blocks ``[start, end)`` of a model.

    ``block_seconds``: measured seconds per block per decoded token (None: not yet
    measured); ``load``: chain sessions it is running; ``slots``: sessions it runs at once;
    ``memory_blocks``: how many blocks its memory could hold (for rebalancing; 0: unknown).
    """

    miner_id: str
    start: int
    end: int
    block_seconds: float | None = None
    load: int = 0
    slots: int = 1
    memory_blocks: int = 0

    def cost(self, blocks: int) -> float:
        """Expected seconds for ``blocks`` of this miner's blocks, one hop included."""
        per = self.block_seconds if self.block_seconds is not None else DEFAULT_BLOCK_SECONDS
        return HOP_SECONDS + blocks * per * (1 + self.load / max(1, self.slots))


@dataclass(frozen=True)
class Link:
    """One step of a chain: ``miner_id`` runs blocks ``[start, end)``."""

    miner_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """A chain covering blocks ``[0, total)`` in order, and its expected ``seconds`` per
    token."""

    links: tuple[Link, ...]
    seconds: float


def plan_chain(miners: Sequence[ShardMiner], total: int,
               exclude: frozenset[str] = frozenset(), start: int = 0,
               end: int | None = None) -> Plan | None:
    """The cheapest chain over blocks ``[start, end)`` (default: the whole model of
    ``total`` blocks) among ``miners`` not in ``exclude`` and with a free slot; None when
    they leave a gap (:func:`missing_blocks` names it). Ties go to fewer hops, then to the
    smaller miner ids, so the same inputs always give the same plan.

    Raises:
        ValueError: ``start``/``end`` outside ``[0, total]`` or empty.
    """
    end = total if end is None else end
    if not 0 <= start < end <= total:
        raise ValueError(f"blocks {start}:{end} are not a range within 0:{total}")
    usable = sorted((m for m in miners if m.miner_id not in exclude and m.load < m.slots
                     and m.start < m.end), key=lambda m: m.miner_id)
    # best[b]: (seconds, hops, ids) of the cheapest chain that has run [start, b).
    best: dict[int, tuple[float, int, tuple[str, ...], tuple[Link, ...]]] = {
        start: (0.0, 0, (), ())}
    for b in range(start, end):
        here = best.get(b)
        if here is None:
            continue
        seconds, hops, ids, links = here
        for m in usable:
            if not m.start <= b < m.end:
                continue
            for e in range(b + 1, min(m.end, end) + 1):
                cand = (seconds + m.cost(e - b), hops + 1, ids + (m.miner_id,),
                        links + (Link(m.miner_id, b, e),))
                old = best.get(e)
                if old is None or cand[:3] < old[:3]:
                    best[e] = cand
    done = best.get(end)
    return Plan(done[3], done[0]) if done is not None else None


def missing_blocks(ranges: Sequence[tuple[int, int]], total: int) -> list[tuple[int, int]]:
    """The ranges ``[start, end)`` of blocks ``0..total`` that none of ``ranges`` holds,
    in order (empty: the model is complete)."""
    held = [False] * total
    for s, e in ranges:
        for b in range(max(0, s), min(e, total)):
            held[b] = True
    gaps: list[tuple[int, int]] = []
    b = 0
    while b < total:
        if held[b]:
            b += 1
            continue
        g = b
        while b < total and not held[b]:
            b += 1
        gaps.append((g, b))
    return gaps


def coverage(ranges: Sequence[tuple[int, int]], total: int) -> list[int]:
    """How many of ``ranges`` hold each block ``0..total``."""
    count = [0] * total
    for s, e in ranges:
        for b in range(max(0, s), min(e, total)):
            count[b] += 1
    return count


def suggest_range(ranges: Sequence[tuple[int, int]], total: int, blocks: int
                  ) -> tuple[int, int]:
    """Where a miner that can hold ``blocks`` blocks should load them, given the ranges
    others hold: the window whose least-held block is held least (a gap first), then the
    one holding the fewest copies in all, then the leftmost.

    Raises:
        ValueError: ``blocks`` < 1.
    """
    if blocks < 1:
        raise ValueError("a shard holds at least one block")
    blocks = min(blocks, total)
    count = coverage(ranges, total)
    best: tuple[int, int, int] | None = None
    for s in range(0, total - blocks + 1):
        window = count[s:s + blocks]
        key = (min(window), sum(window), s)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[2] + blocks


def rebalance(miners: Sequence[ShardMiner], total: int,
              movable: frozenset[str] | None = None) -> tuple[str, tuple[int, int]] | None:
    """A move that closes a gap: a miner (of ``movable``; None: any) whose blocks all stay
    held by others if it leaves, and the range it should load instead
    (:func:`suggest_range` with its ``memory_blocks``, else the size of its range). None
    when nothing is missing, or no miner can move without opening another gap. The most
    redundant miner moves first (its least-held block has the most other holders), ties
    to the smaller id."""
    ranges = [(m.start, m.end) for m in miners]
    if not missing_blocks(ranges, total):
        return None
    count = coverage(ranges, total)
    candidates = []
    for m in miners:
        if movable is not None and m.miner_id not in movable:
            continue
        spare = min((count[b] for b in range(m.start, min(m.end, total))), default=0) - 1
        if spare >= 1:
            candidates.append((-spare, m.miner_id, m))
    if not candidates:
        return None
    _, _, m = min(candidates)
    others = [(o.start, o.end) for o in miners if o is not m]
    size = m.memory_blocks or (m.end - m.start)
    return m.miner_id, suggest_range(others, total, size)
