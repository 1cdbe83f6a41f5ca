"""Choosing a miner for a job, and waiting in a bounded queue when all are busy.

:func:`choose_miner` is a pure decision; :class:`Dispatcher` adds the waiting around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerRegistry, MinerSession


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know of a miner: ``active`` jobs of ``slots``, when it was
    last given a job (monotonic seconds) and its price (µcr per 1M completion tokens, then
    per 1M prompt tokens)."""

    active: int
    slots: int
    last_dispatch: float
    price: tuple[int, int] = (0, 0)


def choose_miner(candidates: Sequence[Candidate]) -> int | None:
    """Index of the miner to use, or None when every slot is taken.

    Least loaded first (share of slots in use, then fewest running jobs); at equal load the
    cheaper miner; then the miner idle longest, so sequential requests spread over equal
    miners.
    """
    best: int | None = None
    best_key: tuple[float, int, tuple[int, int], float] | None = None
    for i, c in enumerate(candidates):
        if c.active >= c.slots:
            continue
        key = (c.active / c.slots, c.active, c.price, c.last_dispatch)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def _price(session: MinerSession, model: str) -> tuple[int, int]:
    offer = session.offer(model)
    return (offer.ask_completion, offer.ask_prompt) if offer else (0, 0)


@dataclass(frozen=True)
class QueuePolicy:
    """``max_waiting`` requests may wait per model for up to ``timeout`` seconds each;
    ``retry_after`` (seconds) is suggested to clients refused with 429."""

    max_waiting: int = 64
    timeout: float = 120.0
    retry_after: int = 1


class Dispatcher:
    """Grants a miner slot to each request, FIFO per model when all slots are busy."""

    def __init__(self, registry: MinerRegistry, policy: QueuePolicy, min_stake: int = 0
                 ) -> None:
        self.registry = registry
        self.policy = policy
        self.min_stake = min_stake
        self._waiting: dict[str, int] = {}

    def waiting(self, model: str) -> int:
        """Requests now queued for ``model``."""
        return self._waiting.get(model, 0)

    def check(self, model: str) -> None:
        """Raise at once if ``model`` is unknown (404) or no live miner with the minimum
        stake serves it (503)."""
        self._live(model)

    def _live(self, model: str) -> list[MinerSession]:
        sessions = self.registry.serving(model)
        if not sessions:
            if not self.registry.is_known(model):
                raise ApiError(404, f"The model '{model}' does not exist. "
                               "GET /v1/models lists the models of this network.",
                               code="model_not_found", param="model")
            raise ApiError(503, f"No miner is serving '{model}' right now; try again later.",
                           code="no_miner_available", type="service_unavailable",
                           headers={"Retry-After": "5"})
        if self.min_stake:
            sessions = [s for s in sessions
                        if self.registry.stakes.get(s.miner_id, 0) >= self.min_stake]
            if not sessions:
                raise ApiError(503, f"No miner serving '{model}' has the minimum stake "
                               f"({self.min_stake} µcr) yet; try again later.",
                               code="no_miner_available", type="service_unavailable",
                               headers={"Retry-After": "5"})
        return sessions

    def _try_pick(self, model: str) -> MinerSession | None:
        sessions = self._live(model)
        i = choose_miner([Candidate(s.active, s.slots, s.last_dispatch, _price(s, model))
                          for s in sessions])
        if i is None:
            return None
        chosen = sessions[i]
        chosen.active += 1
        chosen.last_dispatch = time.monotonic()
        return chosen

    async def acquire(self, model: str) -> MinerSession:
        """A miner with a slot reserved for this request; call :meth:`release` after.

        Raises:
            ApiError: 404 unknown model, 503 no live miner, 429 queue full or wait timed out.
        """
        picked = self._try_pick(model) if not self.waiting(model) else None
        if picked is not None:
            return picked
        if self.waiting(model) >= self.policy.max_waiting:
            raise self._busy(model)
        self._waiting[model] = self.waiting(model) + 1
        deadline = time.monotonic() + self.policy.timeout
        try:
            while True:
                ev = self.registry.listen()
                picked = self._try_pick(model)
                if picked is not None:
                    self.registry.unlisten(ev)
                    return picked
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._busy(model)
                try:
                    async with asyncio.timeout(left):  # not wait_for: see jobs.RunningJob._next
                        await ev.wait()
                except TimeoutError:
                    self.registry.unlisten(ev)
        finally:
            self._waiting[model] -= 1

    def release(self, session: MinerSession) -> None:
        """Return the slot taken by :meth:`acquire`."""
        session.active -= 1
        session.completed += 1
        self.registry.notify()

    def _busy(self, model: str) -> ApiError:
        return ApiError(
            429, f"Every miner serving '{model}' is busy and the queue is full; retry shortly.",
            code="queue_full", type="rate_limit_error",
            headers={"Retry-After": str(self.policy.retry_after)},
        )
