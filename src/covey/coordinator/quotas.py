"""Per-key limits: requests running at once and requests per minute (429 past either).

With several replicas, each counts what it admits and learns what the others admitted
(:mod:`covey.coordinator.shared`): a key's limits hold across the network, within what the
other replicas admit between two of their reports.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from covey.coordinator.errors import ApiError


@dataclass(frozen=True)
class KeyLimitPolicy:
    """``concurrency``: requests one account may have running or queued at once;
    ``per_minute``: requests it may start per minute, as a token bucket that holds a
    minute's worth (a burst of ``per_minute`` after a quiet minute). 0 turns a limit off."""

    concurrency: int = 32
    per_minute: int = 6000


class KeyLimits:
    """Applies :class:`KeyLimitPolicy` per account, in memory.

    ``elsewhere`` holds each account's requests open on other replicas; :meth:`spent`
    takes their starts out of this replica's bucket. With ``shared`` set, what this
    replica admits is kept for :meth:`report`.
    """

    def __init__(self, policy: KeyLimitPolicy, clock=time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # account → (tokens, at)
        self.elsewhere: dict[str, int] = {}
        """Account → its requests running or queued on other replicas."""
        self.shared = False
        """True on a replica among several: admissions are kept for :meth:`report`."""
        self._started: dict[str, int] = {}
        self._touched: set[str] = set()

    def enter(self, account: str) -> None:
        """Admit one request of ``account``; pair with :meth:`leave`.

        Raises:
            ApiError: 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds).
        """
        p = self.policy
        if p.concurrency and (self._open.get(account, 0) + self.elsewhere.get(account, 0)
                              >= p.concurrency):
            raise _limited(f"This API key already has {p.concurrency} requests running; "
                           "wait for one to finish.", 1)
        if p.per_minute:
            now = self._clock()
            rate = p.per_minute / 60.0
            tokens = self._tokens(account, now)
            if tokens < 1.0:
                self._buckets[account] = (tokens, now)
                raise _limited(f"This API key is limited to {p.per_minute} requests per "
                               "minute.", math.ceil((1.0 - tokens) / rate))
            self._buckets[account] = (tokens - 1.0, now)
        self._open[account] = self._open.get(account, 0) + 1
        if self.shared:
            self._started[account] = self._started.get(account, 0) + 1
            self._touched.add(account)

    def _tokens(self, account: str, now: float) -> float:
        p = self.policy
        tokens, at = self._buckets.get(account, (float(p.per_minute), now))
        return min(float(p.per_minute), tokens + (now - at) * p.per_minute / 60.0)

    def leave(self, account: str) -> None:
        """The request admitted by :meth:`enter` has ended."""
        left = self._open.get(account, 1) - 1
        if left > 0:
            self._open[account] = left
        else:
            self._open.pop(account, None)
        if self.shared:
            self._touched.add(account)

    def spent(self, account: str, started: int) -> None:
        """Another replica started ``started`` requests of ``account``: take them out of
        this replica's bucket too, down to a minute's debt at most (so every replica's
        bucket tracks the network's)."""
        p = self.policy
        if not p.per_minute or started <= 0:
            return
        now = self._clock()
        self._buckets[account] = (max(-float(p.per_minute),
                                      self._tokens(account, now) - started), now)

    def report(self, full: bool = False) -> tuple[dict[str, int], dict[str, int]]:
        """What this replica has to tell the others, and forget: (open requests of each
        account whose count changed since the last report, or of every account when
        ``full``; requests started per account since the last report)."""
        accounts = set(self._open) | self._touched if full else self._touched
        opened = {a: self._open.get(a, 0) for a in accounts}
        started, self._started, self._touched = self._started, {}, set()
        return opened, started

    def open(self, account: str) -> int:
        """Requests of ``account`` running or queued on this replica."""
        return self._open.get(account, 0)


def _limited(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, code="rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": str(max(1, retry_after))})
