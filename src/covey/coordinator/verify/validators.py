"""Borrowing a validator: a live miner with the same weights as the miner being checked,
queued ahead of new requests under the validators' own account."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerSession
from covey.coordinator.router import Dispatcher

VALIDATOR_ACCOUNT = "covey:validator"
"""The account re-checks queue under for a validator's slot (fair-queued like a user)."""


@contextlib.asynccontextmanager
async def validator(dispatcher: Dispatcher, model: str, sha256: str | None,
                    exclude: Sequence[str], timeout: float,
                    unavailable: Callable[[str], Exception]) -> AsyncIterator[MinerSession]:
    """A slot on a miner of ``model`` (with weights ``sha256`` when given) not in
    ``exclude``, released on exit.

    Raises:
        Exception: ``unavailable(reason)`` when none is free within ``timeout`` seconds
            (or none serves the weights).
    """
    try:
        async with asyncio.timeout(timeout):
            session = await dispatcher.acquire(model, VALIDATOR_ACCOUNT, sha256,
                                               frozenset(exclude), priority=True)
    except (ApiError, TimeoutError) as exc:
        raise unavailable(getattr(exc, "message", "no validator was free")) from None
    try:
        yield session
    finally:
        dispatcher.release(session, VALIDATOR_ACCOUNT, model)
