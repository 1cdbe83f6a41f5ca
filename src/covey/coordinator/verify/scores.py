"""Verifying scoring miners: false proofs, sampled re-checks and trials.

- **Proved answers** are verified by the coordinator before they are accepted
  (:mod:`covey.coordinator.run_score`); a proof that does not verify is a failed check of
  kind ``proof``, slashed at once with the proof as evidence.
- **Plain answers** are re-checked at the policy's rate: a validator with the same weights
  (the same ``model.onnx``) scores the same rows, and every output must agree within
  :data:`SCORE_TOLERANCE`.
- **Encrypted answers** are re-checked the same way when CKKS evaluation is reproducible
  byte for byte (:data:`covey.scoring.he.DETERMINISTIC`): the validator gets the same
  ciphertext and keys and must return the same ciphertext. The coordinator never decrypts
  (it cannot: only the client holds the secret key).
- **Trials** score rows spread over the card's feature ranges on the new miner and on a
  validator with the same weights (no reference answers ship: each folder's model is its
  owner's).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence

from covey.coordinator.api.requests import new_id
from covey.coordinator.errors import ApiError
from covey.coordinator.he_keys import KeyStore
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.ledger.penalties import Evidence
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import Outcome, ScoreAnswer
from covey.coordinator.router import Dispatcher
from covey.coordinator.run_score import KeySource, call_score
from covey.coordinator.verify.embeddings import MAX_PENDING_CHECKS
from covey.coordinator.verify.judge import CheckPolicy, Verdict
from covey.coordinator.verify.validators import NoVerdict, SampledChecks, validator
from covey.protocol import ModelOffer, Score, Scored

log = logging.getLogger("covey.coordinator.verify")

SCORE_TOLERANCE = 1e-5
"""Largest difference between a miner's and a validator's score of the same row. One
onnxruntime build gives identical float32 results here; other CPUs and builds reorder sums,
which moves a probability by ~1e-7; a perturbed or made-up score is far off."""

TRIAL_ROWS = 4
"""Rows a scoring trial scores: spread from the low to the high end of each feature."""


class ScoreUnavailable(NoVerdict):
    """No validator could score the rows (none online, busy, or it failed)."""


def judge_scores(expected: Sequence[float], got: Sequence[float]) -> Verdict:
    """Fail outputs that differ from the validator's by more than :data:`SCORE_TOLERANCE`
    (or are another count)."""
    verdict = Verdict()
    if len(expected) != len(got):
        verdict.reasons.append(f"{len(got)} scores where {len(expected)} were due")
        return verdict
    worst = max((abs(e - g), i) for i, (e, g) in enumerate(zip(expected, got, strict=True)))
    verdict.figures = {"largest_difference": worst[0], "bound": SCORE_TOLERANCE,
                       "row": worst[1], "scores": list(got[:16]), "trusted": list(expected[:16])}
    if worst[0] > SCORE_TOLERANCE:
        verdict.reasons.append(f"row {worst[1]} scored {got[worst[1]]}; the validator's score "
                               f"is {expected[worst[1]]} (at most {SCORE_TOLERANCE} apart)")
    return verdict


def judge_ciphertext(expected: str, got: str) -> Verdict:
    """Fail an encrypted answer that is not byte for byte the validator's."""
    verdict = Verdict(figures={"same_ciphertext": expected == got})
    if expected != got:
        verdict.reasons.append("the encrypted score differs from the validator's for the "
                               "same ciphertext and keys")
    return verdict


def trial_rows(offer: ModelOffer) -> tuple[tuple[float, ...], ...]:
    """:data:`TRIAL_ROWS` rows from each feature's low to its high end (the middle of the
    card's ranges; 0..1 for features without one)."""
    card = offer.card
    assert card is not None
    ranges = card.ranges or tuple((0.0, 1.0) for _ in card.features)
    rows = []
    for k in range(TRIAL_ROWS):
        share = (k + 1) / (TRIAL_ROWS + 1)
        rows.append(tuple(lo + (hi - lo) * share for lo, hi in ranges))
    return tuple(rows)


class ScoreVerification(SampledChecks):
    """The :class:`~covey.coordinator.verify.checker.Verifier`'s part for scoring models."""

    dispatcher: Dispatcher
    policy: CheckPolicy
    metrics: Metrics
    score_keys: KeyStore | None
    _pending: int
    _rng: random.Random
    _spawn: Callable[[Awaitable[None]], None]
    punish: Callable[[Evidence], Awaitable[object]]

    def false_proof(self, session: MinerSession, task: Score, reply: Scored,
                    reason: str) -> None:
        """A proof of ``session``'s did not verify: slash it (``run_score`` calls this
        before moving the task to another miner, so the user pays nobody for it)."""
        self.metrics.checks.labels("proof", "failed").inc()
        verdict = Verdict([reason], {"proofs": [p[:2000] for p in reply.proofs],
                                     "inputs": [list(r) for r in task.inputs or ()],
                                     "outputs": list(reply.outputs or ())})
        self._spawn(self.punish(Evidence(new_id("chk"), "proof", task.job_id,
                                         session.miner_id, task.model_sha256 or "",
                                         verdict.as_dict(), None, None)))

    def _maybe_check_score(self, outcome: Outcome, answer: ScoreAnswer,
                           settlement: Awaitable[object]) -> None:
        """After a scoring request: punish false usage, else re-check a share
        ``policy.rate`` of plain and encrypted answers (proved ones were verified)."""
        if outcome.fault is None:
            if answer.sent.proof or outcome.failovers or self._rng.random() >= self.policy.rate:
                return
            if answer.encrypted is not None and not _he_deterministic():
                return
            if self._pending >= MAX_PENDING_CHECKS:
                self.metrics.checks.labels("sampled", "skipped").inc()
                return
        self._pending += 1
        self._spawn(self._sampled_single(outcome, answer.sent.model_sha256 or "", settlement,
                                         lambda ex: self._recheck_score(outcome, answer, ex)))

    async def _recheck_score(self, outcome: Outcome, answer: ScoreAnswer,
                             exclude: Sequence[str]) -> tuple[Verdict, str | None]:
        trusted, validator_id = await self._validator_score(answer.sent, exclude,
                                                            outcome.account)
        if answer.encrypted is not None:
            return judge_ciphertext(trusted.encrypted or "", answer.encrypted), validator_id
        return judge_scores(trusted.outputs or (), answer.outputs or ()), validator_id

    async def _validator_score(self, task: Score, exclude: Sequence[str], account: str = ""
                               ) -> tuple[Scored, str]:
        """``task`` (a fresh id, pinned weights) on a validator not in ``exclude``; an
        encrypted task's keys are ``account``'s.

        Raises:
            ScoreUnavailable: none is free within the timeout, or it failed.
        """
        async with validator(self.dispatcher, task.model, task.model_sha256, exclude,
                             self.policy.timeout, ScoreUnavailable) as session:
            again = task.model_copy(update={"job_id": new_id("chk"), "proof": False})
            store = self.score_keys
            keys = None if store is None else lambda sha256: store.get(account, sha256)
            return await _score_on(session, again, self.policy.timeout, keys), session.miner_id

    def _score_judgeable(self, offer: ModelOffer, miner_id: str) -> bool:
        """A scoring trial can be judged when another miner serves the same weights."""
        return offer.card is not None and any(
            s.miner_id != miner_id and (o := s.offer(offer.name)) is not None
            and o.sha256 == offer.sha256 for s in self.dispatcher.registry.serving(offer.name))

    async def _judge_score_trial(self, session: MinerSession, offer: ModelOffer,
                                 others: Sequence[str] = ()
                                 ) -> tuple[Verdict, str, str | None] | None:
        """A scoring trial on ``session``: (verdict, task id, validator id, not one of
        ``others``), or None when the miner did not answer."""
        task = Score(job_id=new_id("score"), model=offer.name, model_sha256=offer.sha256,
                     inputs=trial_rows(offer))
        try:
            got = await _score_on(session, task, self.policy.timeout, None)
        except ScoreUnavailable:
            return None
        try:
            trusted, validator_id = await self._validator_score(task, [session.miner_id,
                                                                       *others])
        except ScoreUnavailable as exc:
            return Verdict(figures={"unverified": str(exc), "nobody": exc.nobody}), \
                task.job_id, None
        return judge_scores(trusted.outputs or (), got.outputs or ()), task.job_id, \
            validator_id


async def _score_on(session: MinerSession, task: Score, timeout: float,
                    keys: KeySource | None) -> Scored:
    """``task``'s answer from ``session`` (a trial or a validator's run).

    Raises:
        ScoreUnavailable: the miner refused, failed, left or took over ``timeout`` s.
    """
    try:
        async with asyncio.timeout(timeout):
            return await call_score(session, task, timeout, keys)
    except TimeoutError:
        raise ScoreUnavailable(f"no answer within {timeout:.0f} s") from None
    except ApiError as exc:
        raise ScoreUnavailable(f"the miner refused: {exc.message}") from None
    except MinerFault as fault:
        raise ScoreUnavailable(f"the miner failed ({fault.reason})") from None


def _he_deterministic() -> bool:
    try:
        from covey.scoring.he import DETERMINISTIC
    except ImportError:
        return False
    return bool(DETERMINISTIC)

