"""Borrowing a validator (a live miner with the same weights as the miner being checked,
queued ahead of new requests under the validators' own account), and running a sampled
re-check of a single-answer request to its verdict and penalty."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from covey.coordinator.api.requests import new_id
from covey.coordinator.errors import ApiError
from covey.coordinator.ledger.penalties import Evidence
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import Outcome
from covey.coordinator.router import Dispatcher
from covey.coordinator.verify.judge import Verdict

log = logging.getLogger("covey.coordinator.verify")

VALIDATOR_ACCOUNT = "covey:validator"
"""The account re-checks queue under for a validator's slot (fair-queued like a user)."""


@contextlib.asynccontextmanager
async def validator(dispatcher: Dispatcher, model: str, sha256: str | None,
                    exclude: Sequence[str], timeout: float,
                    unavailable: type[NoVerdict]) -> AsyncIterator[MinerSession]:
    """A slot on a miner of ``model`` (with weights ``sha256`` when given) not in
    ``exclude``, released on exit.

    Raises:
        NoVerdict: ``unavailable(reason)`` when none is free within ``timeout`` seconds
            (or none serves the weights: its ``nobody`` is then True).
    """
    session = await borrow(dispatcher, model, sha256, exclude, timeout, unavailable)
    try:
        yield session
    finally:
        dispatcher.release(session, VALIDATOR_ACCOUNT, model)


async def borrow(dispatcher: Dispatcher, model: str, sha256: str | None,
                 exclude: Sequence[str], timeout: float,
                 unavailable: type[NoVerdict]) -> MinerSession:
    """A validator's slot, as :func:`validator` takes it (the caller releases it with
    ``dispatcher.release(session, VALIDATOR_ACCOUNT, model)``).

    Raises:
        NoVerdict: ``unavailable(reason)``, with ``nobody`` True when no live miner outside
            ``exclude`` serves the weights at all (rather than none being free in time).
    """
    try:
        async with asyncio.timeout(timeout):
            return await dispatcher.acquire(model, VALIDATOR_ACCOUNT, sha256,
                                            frozenset(exclude), priority=True)
    except (ApiError, TimeoutError) as exc:
        raise unavailable(getattr(exc, "message", "no validator was free"),
                          nobody=isinstance(exc, ApiError)
                          and exc.code == "no_miner_available") from None


class NoVerdict(Exception):
    """No validator could give a verdict (none online or free, or it failed).

    ``nobody`` is True when no other miner serves the weights at all (the network has no
    validator left to ask), False when one exists but was busy or failed."""

    def __init__(self, *args: object, nobody: bool = False) -> None:
        super().__init__(*args)
        self.nobody = nobody


class SampledChecks:
    """The part of the :class:`~covey.coordinator.verify.checker.Verifier` that every
    single-answer kind (embeddings, media) shares: a sampled re-check from settlement to
    penalty."""

    metrics: Metrics
    _pending: int
    punish: Callable[[Evidence], Awaitable[object]]
    paid: Callable[[str | None, str], None]
    convict: Callable[..., Awaitable[bool]]

    async def _sampled_single(self, outcome: Outcome, model_sha256: str,
                       settlement: Awaitable[object],
                       recheck: Callable[[Sequence[str]],
                                         Awaitable[tuple[Verdict, str | None]]]) -> None:
        """Once ``settlement`` has landed, judge ``outcome``: its usage fault if it has one,
        else ``recheck(exclude)``'s verdict (and validator id; ``exclude`` holds the miner
        and any validators already asked); a failure confirmed by a second validator
        (:mod:`covey.coordinator.verify.confirm`) is punished (slash and refund,
        :mod:`covey.coordinator.ledger.penalties`). Counts itself out of ``_pending``."""
        assert outcome.miner_id is not None
        kind = "usage" if outcome.fault is not None else "sampled"
        validator_id: str | None = None
        try:
            await settlement
            if outcome.fault is not None:
                verdict = Verdict([outcome.fault], {"receipt": outcome.receipt[0].model_dump()
                                                    if outcome.receipt else None})
            else:
                verdict, validator_id = await recheck([outcome.miner_id])
                self.paid(validator_id, outcome.job_id)
        except NoVerdict as exc:
            self.metrics.checks.labels("sampled", "skipped").inc()
            log.info("%s not re-checked: %s", outcome.job_id, exc)
            return
        except Exception:  # noqa: BLE001 - the settlement logs its own failure
            return
        finally:
            self._pending -= 1
        self.metrics.checks.labels(kind, "passed" if verdict.passed else "failed").inc()
        if verdict.passed:
            return
        log.warning("%s: miner %s failed a %s check: %s", outcome.job_id,
                    outcome.miner_id[:16], kind, "; ".join(verdict.reasons))
        await self.convict(Evidence(new_id("chk"), kind, outcome.job_id, outcome.miner_id,
                                    model_sha256, verdict.as_dict(), outcome.account,
                                    validator_id), recheck)
