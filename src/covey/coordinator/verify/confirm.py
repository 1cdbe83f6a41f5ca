"""Checking the validators: a failed verdict is confirmed before any slash, every validator
is paid per check whatever it reports, and one that disagrees with the ruling loses
reputation.

- **Confirmation.** A failed verdict is put to a second validator (another miner with the
  same weights, neither the accused nor the first). Two failing reports convict; a passing
  one calls a third validator to break the tie, and the majority rules. A tie with no third
  validator, or a second one that is busy or fails, leaves the accusation unconfirmed: no
  slash, no refund, no reputation lost by the accused.
- **One validator.** Where no miner but the first serves those weights at all (a network
  of two), nobody is left to ask and the first verdict stands alone, as it always did. The
  framing defence needs a third miner with the weights; ``covey_checks_total`` counts
  verdicts ruled this way as ``result="alone"``.
- **Pay.** Each validator that reports is paid for the check, win or lose: the miner's pay
  for the checked job (what re-doing it is worth), at least ``CheckPolicy.validator_fee``
  µcr, from the network's issuance (the faucet, as sign-up grants and canaries are;
  :func:`pay_validator`). The slashed stake goes to the treasury
  (``CheckPolicy.validator_bps`` is 0), so framing an honest miner earns a validator
  nothing.
- **Reputation.** A validator whose report differs from the ruling (an unconfirmed
  accuser, or one that passed what the majority failed) counts a failure in the
  scoreboard, as a failed job would (fewer jobs, a new trial below the floor).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from covey.coordinator.billing import Billing
from covey.coordinator.ledger.bank import Bank, miner
from covey.coordinator.ledger.penalties import Evidence, job_cost
from covey.coordinator.ledger.store import FAUCET, Transfer
from covey.coordinator.metrics import Metrics
from covey.coordinator.router import Dispatcher
from covey.coordinator.verify.judge import CheckPolicy, Verdict
from covey.coordinator.verify.validators import NoVerdict

log = logging.getLogger("covey.coordinator.verify")

Rejudge = Callable[[Sequence[str]], Awaitable[tuple[Verdict, str | None]]]
"""Re-run a check on a validator not among the given miner ids (the accused and the
validators asked so far): its verdict and its miner id. Raises
:class:`~covey.coordinator.verify.validators.NoVerdict` (``nobody`` set when no miner
outside them serves the weights)."""


@dataclass
class Ruling:
    """The outcome of confirming a failed verdict.

    ``votes``: (validator id, passed) in the order asked, the first validator's first.
    ``confirmed``: the accused is punished. ``alone``: confirmed on the first validator's
    word only, because no other miner serves the weights. ``reason``: why a vote is
    missing, when one is.
    """

    votes: list[tuple[str, bool]]
    confirmed: bool
    alone: bool = False
    reason: str = ""

    @property
    def dissenters(self) -> list[str]:
        """Validators whose report differs from the ruling (none when it stands alone or
        no vote broke a tie: an unconfirmed accuser counts only once outvoted)."""
        if self.alone:
            return []
        fails = sum(not passed for _, passed in self.votes)
        passes = len(self.votes) - fails
        if fails == passes:
            return []
        return [v for v, passed in self.votes if passed == self.confirmed]

    def as_figures(self) -> list[dict[str, object]]:
        """The votes as evidence (kept in the verdict's figures)."""
        return [{"validator": v, "passed": passed} for v, passed in self.votes]


async def rule(first_validator: str, accused: str, rejudge: Rejudge) -> Ruling:
    """Confirm a failed verdict from ``first_validator`` on ``accused``'s answer by
    majority of up to three validators (see the module docstring)."""
    votes: list[tuple[str, bool]] = [(first_validator, False)]
    while True:
        fails = sum(not passed for _, passed in votes)
        if fails >= 2:
            return Ruling(votes, True)
        if len(votes) - fails >= 2:
            return Ruling(votes, False)
        try:
            verdict, validator_id = await rejudge([accused, *(v for v, _ in votes)])
        except NoVerdict as exc:
            alone = len(votes) == 1 and exc.nobody
            return Ruling(votes, alone, alone=alone, reason=str(exc))
        votes.append((validator_id or "", verdict.passed))


def pay_validator(bank: Bank, validator_id: str, job_id: str, floor: int) -> int:
    """Pay ``validator_id`` for checking ``job_id``: what the job paid its miner (nothing
    for a trial), at least ``floor`` µcr, minted by the faucet. Idempotent per (job,
    validator); returns µcr paid (0 when this check was already paid)."""
    amount = max(job_cost(bank, job_id)[1], floor)
    if amount <= 0:
        return 0
    applied = bank.ledger.post(f"validator-fee:{job_id}:{validator_id}"[:180],
                               [Transfer(FAUCET, miner(validator_id), amount, "validator_fee")])
    return amount if applied else 0


def with_votes(evidence: Evidence, ruling: Ruling) -> Evidence:
    """``evidence`` with the validators' votes added to its verdict's figures."""
    figures = dict(evidence.verdict.get("figures") or {})  # type: ignore[call-overload]
    figures["votes"] = ruling.as_figures()
    if ruling.alone:
        figures["alone"] = "no other validator serves these weights"
    return Evidence(evidence.check_id, evidence.kind, evidence.job_id, evidence.miner_id,
                    evidence.model_sha256, {**evidence.verdict, "figures": figures},
                    evidence.account, evidence.validator)


class Confirmation:
    """The part of the :class:`~covey.coordinator.verify.checker.Verifier` that checks its
    validators: pays each for its reports and confirms failed verdicts before punishing."""

    billing: Billing
    dispatcher: Dispatcher
    metrics: Metrics
    policy: CheckPolicy
    punish: Callable[[Evidence], Awaitable[object]]
    _spawn: Callable[[Awaitable[None]], None]

    def paid(self, validator_id: str | None, job_id: str) -> None:
        """Pay ``validator_id`` for its report on ``job_id``, in the background (nothing
        when no validator reported)."""
        if validator_id:
            self._spawn(self._pay(validator_id, job_id))

    async def _pay(self, validator_id: str, job_id: str) -> None:
        try:
            fee = await self.billing.ledger_call(pay_validator, self.billing.bank,
                                                 validator_id, job_id,
                                                 self.policy.validator_fee)
        except Exception:  # noqa: BLE001 - a fee must not break a check
            log.exception("paying validator %s for %s failed", validator_id[:16], job_id)
            return
        self.metrics.validator_fees.inc(fee)

    async def convict(self, evidence: Evidence, rejudge: Rejudge | None) -> bool:
        """Punish ``evidence`` (a failed verdict) once confirmed: at once when the
        coordinator itself judged (``evidence.validator`` None, or no ``rejudge``), else
        by :func:`rule`. Pays the extra validators, costs the dissenters reputation.
        Returns whether the miner was punished."""
        if evidence.validator is None or rejudge is None:
            await self.punish(evidence)
            return True
        ruling = await rule(evidence.validator, evidence.miner_id, rejudge)
        for validator_id, _ in ruling.votes[1:]:
            self.paid(validator_id, evidence.job_id)
        for validator_id in ruling.dissenters:
            self.dispatcher.scores.failure(validator_id)
            self.metrics.dissents.inc()
            log.warning("validator %s disagreed with the ruling on %s (%s)",
                        validator_id[:16], evidence.job_id, ruling.as_figures())
        if not ruling.confirmed:
            self.metrics.checks.labels(evidence.kind, "unconfirmed").inc()
            log.warning("%s: validator %s failed miner %s, unconfirmed (%s): not punished",
                        evidence.job_id, evidence.validator[:16], evidence.miner_id[:16],
                        ruling.reason or ruling.as_figures())
            return False
        if ruling.alone:
            self.metrics.checks.labels(evidence.kind, "alone").inc()
        await self.punish(with_votes(evidence, ruling))
        return True
