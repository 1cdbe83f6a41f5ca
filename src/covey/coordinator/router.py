"""Choosing a miner for a job, and a fair, bounded queue when all are busy.

:func:`choose_miner` is a pure decision; :class:`Dispatcher` keeps the miners with a free
slot per model and the requests waiting for one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerRegistry, MinerSession
from covey.coordinator.scores import Scoreboard

_BUCKET = math.log(1.25)
"""Reputation and speed are compared on a grid of 25% steps (1, 1.25, 1.5625 …): miners on
the same step count as equal and the one idle longest goes first, so noise in the
measurements cannot pin all traffic on one of two equal miners."""

SAMPLE_ABOVE = 16
"""With more free miners than this, routing looks at :data:`SAMPLE_SIZE` of them drawn at
random ("power of d choices", Mitzenmacher 2001: nearly the balance of a full scan at a
fixed cost, so a request costs the same with 10 miners or 10,000)."""
SAMPLE_SIZE = 8


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know of a miner: ``active`` jobs of ``slots``, when it was
    last given a job (monotonic seconds), its price (µcr per 1M completion tokens, then
    per 1M prompt tokens), its ``reputation`` and the seconds it is expected to take for a
    typical answer (None: not measured yet)."""

    active: int
    slots: int
    last_dispatch: float
    price: tuple[int, int] = (0, 0)
    reputation: float = 1.0
    expected_s: float | None = None


def _bucket(x: float) -> int:
    return math.floor(math.log(x) / _BUCKET + 1e-9)


def _key(c: Candidate) -> tuple[float, int, int, tuple[int, int], int, float]:
    # An unmeasured miner ranks as fastest, so every newcomer gets tried and measured.
    speed = 10**6 if c.expected_s is None else -_bucket(max(c.expected_s, 1e-3))
    return (c.active / c.slots, c.active, -_bucket(c.reputation), c.price, -speed,
            c.last_dispatch)


def choose_miner(candidates: Sequence[Candidate]) -> int | None:
    """Index of the miner to use, or None when every slot is taken.

    In order: least loaded (share of slots in use, then fewest running jobs); higher
    reputation; cheaper; faster (measured time to first token plus decode time of a typical
    answer); then the miner idle longest, so sequential requests spread over equal miners.
    Reputation and speed count in 25% steps (see :data:`_BUCKET`).
    """
    best: int | None = None
    best_key: tuple[float, int, int, tuple[int, int], int, float] | None = None
    for i, c in enumerate(candidates):
        if c.active >= c.slots:
            continue
        key = _key(c)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


@dataclass(frozen=True)
class QueuePolicy:
    """``max_waiting`` requests may wait per model for up to ``timeout`` seconds each;
    ``retry_after`` (seconds) is suggested to clients refused with 429."""

    max_waiting: int = 64
    timeout: float = 120.0
    retry_after: int = 1


@dataclass(eq=False)
class _Waiter:
    account: str
    sha256: str | None
    exclude: frozenset[str]
    future: asyncio.Future[MinerSession] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Dispatcher:
    """Grants a miner slot to each request.

    When every slot is busy, requests wait per model; a freed slot goes to the waiting
    account with the fewest jobs running, first come first served within an account, so one
    user sending a flood cannot starve the others. Failed-over jobs go before new ones.
    """

    def __init__(self, registry: MinerRegistry, policy: QueuePolicy, min_stake: int = 0,
                 scores: Scoreboard | None = None) -> None:
        self.registry = registry
        self.policy = policy
        self.min_stake = min_stake
        self.scores = scores or Scoreboard()
        self.running: dict[str, int] = {}
        """Jobs running per account."""
        self._served: dict[str, int] = {}  # account → number of the grant it last got
        self._grants = 0
        self._waiting: dict[str, dict[str, deque[_Waiter]]] = {}
        self._priority: dict[str, deque[_Waiter]] = {}
        self._free: dict[str, dict[MinerSession, None]] = {}
        self._free_dirty = True
        registry.on_change.append(self._changed)

    def waiting(self, model: str | None = None) -> int:
        """Requests now queued for ``model`` (all models when None)."""
        models = [model] if model is not None else list(self._waiting)
        return sum(len(q) for m in models for q in self._waiting.get(m, {}).values()) + sum(
            len(self._priority.get(m, ())) for m in models)

    def check(self, model: str) -> None:
        """Raise at once if ``model`` is unknown (404) or no live miner with the minimum
        stake serves it (503)."""
        self._live(model)

    def _live(self, model: str, sha256: str | None = None,
              exclude: frozenset[str] = frozenset()) -> list[MinerSession]:
        sessions = self.registry.serving(model)
        failover = sha256 is not None or bool(exclude)
        if not sessions:
            # A model offered only by miners (not the catalog) is unknown once they all
            # left; a job already running on it is told "no miner", not "no such model".
            if not self.registry.is_known(model) and not failover:
                raise ApiError(404, f"The model '{model}' does not exist. "
                               "GET /v1/models lists the models of this network.",
                               code="model_not_found", param="model")
            raise _no_miner(f"No miner is serving '{model}' right now; try again later.")
        if self.min_stake:
            sessions = [s for s in sessions if self._staked(s)]
            if not sessions:
                raise _no_miner(f"No miner serving '{model}' has the minimum stake "
                                f"({self.min_stake} µcr) yet; try again later.")
        if failover:
            sessions = [s for s in sessions if self._fits(s, model, sha256, exclude)]
            if not sessions:
                raise _no_miner(f"No miner serving '{model}' with the same weights is left "
                                "that has not had the request.")
        return sessions

    def _staked(self, s: MinerSession) -> bool:
        return self.registry.stakes.get(s.miner_id, 0) >= self.min_stake

    @staticmethod
    def _fits(s: MinerSession, model: str, sha256: str | None, exclude: frozenset[str]
              ) -> bool:
        if s.miner_id in exclude:
            return False
        offer = s.offer(model)
        return offer is not None and (sha256 is None or offer.sha256 == sha256)

    # -- free slots -------------------------------------------------------------------

    def _changed(self) -> None:
        self._free_dirty = True
        for model in [m for m in set(self._waiting) | set(self._priority) if self.waiting(m)]:
            waiters = list(self._priority.get(model, ())) + [
                w for q in self._waiting.get(model, {}).values() for w in q]
            for w in waiters:
                try:
                    self._live(model, w.sha256, w.exclude)
                except ApiError as exc:  # no miner it could use is left: waiting can't help
                    if not w.future.done():
                        w.future.set_exception(exc)
        self._drain()

    def refresh(self) -> None:
        """Slots changed outside this replica's own grants (another replica's report):
        count the free ones again and hand them to those waiting."""
        self._free_dirty = True
        self._drain()

    def _free_set(self, model: str) -> dict[MinerSession, None]:
        if self._free_dirty:
            self._free = {}
            for s in self.registry.sessions.values():
                for m in s.hello.models:
                    if s.free_for(m.name):
                        self._free.setdefault(m.name, {})[s] = None
            self._free_dirty = False
        return self._free.setdefault(model, {})

    def _candidate(self, s: MinerSession, model: str) -> Candidate:
        offer = s.offer(model)
        score = self.scores.get(s.miner_id)
        active = s.busy.get(model, 0) + s.elsewhere.get(model, 0)  # on every replica
        return Candidate(active, s.slots_for(model), s.last_dispatch,
                         (offer.ask_completion, offer.ask_prompt) if offer else (0, 0),
                         score.reputation, score.expected_seconds())

    def _try_pick(self, model: str, w: _Waiter) -> MinerSession | None:
        free = self._free_set(model)
        pool = list(free) if len(free) <= SAMPLE_ABOVE else random.sample(list(free),
                                                                           SAMPLE_SIZE)
        def usable(s: MinerSession) -> bool:
            return (not s.closed and (not self.min_stake or self._staked(s))
                    and self._fits(s, model, w.sha256, w.exclude))

        ok = [s for s in pool if usable(s)]
        if not ok and len(pool) < len(free):  # the sample missed: look at them all
            ok = [s for s in free if usable(s)]
        # Another replica's miner costs a relay per frame, and this replica learns of the
        # jobs there only from reports: its own miners go first while one has a free slot.
        near = [s for s in ok if s.local]
        if not near and len(pool) < len(free) and any(not s.local for s in ok):
            near = [s for s in free if s.local and usable(s)]  # the sample missed them
        if near:
            ok = near
        i = choose_miner([self._candidate(s, model) for s in ok])
        if i is None:
            return None
        chosen = ok[i]
        self._take(chosen, model, w.account)
        return chosen

    def _take(self, s: MinerSession, model: str, account: str) -> None:
        s.active += 1
        s.busy[model] = s.busy.get(model, 0) + 1
        s.last_dispatch = time.monotonic()
        self.running[account] = self.running.get(account, 0) + 1
        self._grants += 1
        self._served[account] = self._grants
        if not s.free_for(model):
            self._free.get(model, {}).pop(s, None)

    def release(self, session: MinerSession, account: str = "", model: str | None = None
                ) -> None:
        """Return the slot of ``model`` taken by :meth:`acquire` for ``account`` (``model``
        may be left out for a miner serving one model).

        Raises:
            ValueError: ``model`` left out for a miner serving several.
        """
        if model is None:
            if len(session.hello.models) != 1:
                raise ValueError("release() needs the model of a miner serving several")
            model = session.hello.models[0].name
        session.active -= 1
        session.busy[model] = session.busy.get(model, 1) - 1
        session.completed += 1
        left = self.running.get(account, 1) - 1
        if left:
            self.running[account] = left
        else:
            self.running.pop(account, None)
            if not any(account in q for q in self._waiting.values()):
                self._served.pop(account, None)
        if session.free_for(model) and not self._free_dirty:
            self._free.setdefault(model, {})[session] = None
        self._drain()

    # -- waiting ----------------------------------------------------------------------

    async def acquire(self, model: str, account: str = "", sha256: str | None = None,
                      exclude: frozenset[str] = frozenset(), priority: bool = False
                      ) -> MinerSession:
        """A miner with a slot reserved for this request; call :meth:`release` after.

        ``sha256`` pins the weights; miners in ``exclude`` are not used; ``priority`` puts
        the request ahead of new ones (a failover).

        Raises:
            ApiError: 404 unknown model, 503 no live miner (or none that fits), 429 queue
                full or wait timed out.
        """
        self._live(model, sha256, exclude)
        w = _Waiter(account, sha256, exclude)
        if not self.waiting(model) or priority:
            picked = self._try_pick(model, w)
            if picked is not None:
                return picked
        if not priority and self.waiting(model) >= self.policy.max_waiting:
            raise self._busy(model)
        if priority:
            self._priority.setdefault(model, deque()).append(w)
        else:
            self._waiting.setdefault(model, {}).setdefault(account, deque()).append(w)
        # Those ahead may be unable to use a free slot (a failover excludes its failed
        # miner): hand out what is free now, in the queue's order.
        self._drain()
        try:
            async with asyncio.timeout(self.policy.timeout):
                return await w.future
        except TimeoutError:
            raise self._busy(model) from None
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled():
                self.release(w.future.result(), account, model)  # granted as we were cancelled
            raise
        finally:
            self._forget(model, w)

    def _forget(self, model: str, w: _Waiter) -> None:
        queue = self._priority.get(model)
        if queue and w in queue:
            queue.remove(w)
        per_account = self._waiting.get(model, {})
        q = per_account.get(w.account)
        if q is not None:
            if w in q:
                q.remove(w)
            if not q:
                del per_account[w.account]

    def _order(self, model: str) -> list[_Waiter]:
        """Waiters of ``model`` in the order slots go to them: failovers, then the head of
        each account's line, fewest running jobs first, then the account served longest
        ago (round robin)."""
        heads = sorted(((self.running.get(a, 0), self._served.get(a, 0), q[0])
                        for a, q in self._waiting.get(model, {}).items() if q),
                       key=lambda t: (t[0], t[1]))
        return list(itertools.chain(self._priority.get(model, ()), (w for _, _, w in heads)))

    def _drain(self) -> None:
        """Hand free slots to waiters until no waiter can use one."""
        for model in [m for m in set(self._waiting) | set(self._priority) if self.waiting(m)]:
            progress = True
            while progress:
                progress = False
                if not self._free_set(model):
                    break
                for w in self._order(model):
                    if w.future.done():
                        continue
                    picked = self._try_pick(model, w)
                    if picked is not None:
                        w.future.set_result(picked)
                        self._forget(model, w)
                        progress = True
                        break

    def _busy(self, model: str) -> ApiError:
        return ApiError(
            429, f"Every miner serving '{model}' is busy and the queue is full; retry shortly.",
            code="queue_full", type="rate_limit_error",
            headers={"Retry-After": str(self.policy.retry_after)},
        )


def _no_miner(message: str) -> ApiError:
    return ApiError(503, message, code="no_miner_available", type="service_unavailable",
                    headers={"Retry-After": "5"})
