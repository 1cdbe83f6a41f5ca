"""Per-key limits: requests running at once and requests per minute (429 past either)."""

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
    """Applies :class:`KeyLimitPolicy` per account, in memory (one coordinator process)."""

    def __init__(self, policy: KeyLimitPolicy, clock=time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # account → (tokens, at)

    def enter(self, account: str) -> None:
        """Admit one request of ``account``; pair with :meth:`leave`.

        Raises:
            ApiError: 429 ``rate_limit_exceeded`` with ``Retry-After`` (seconds).
        """
        p = self.policy
        if p.concurrency and self._open.get(account, 0) >= p.concurrency:
            raise _limited(f"This API key already has {p.concurrency} requests running; "
                           "wait for one to finish.", 1)
        if p.per_minute:
            now = self._clock()
            rate = p.per_minute / 60.0
            tokens, at = self._buckets.get(account, (float(p.per_minute), now))
            tokens = min(float(p.per_minute), tokens + (now - at) * rate)
            if tokens < 1.0:
                self._buckets[account] = (tokens, now)
                raise _limited(f"This API key is limited to {p.per_minute} requests per "
                               "minute.", math.ceil((1.0 - tokens) / rate))
            self._buckets[account] = (tokens - 1.0, now)
        self._open[account] = self._open.get(account, 0) + 1

    def leave(self, account: str) -> None:
        """The request admitted by :meth:`enter` has ended."""
        left = self._open.get(account, 1) - 1
        if left > 0:
            self._open[account] = left
        else:
            self._open.pop(account, None)


def _limited(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, code="rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": str(max(1, retry_after))})
