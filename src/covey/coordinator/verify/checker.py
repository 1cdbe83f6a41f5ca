"""The verification scheduler: trials on join, sampled re-checks, canaries, usage faults,
penalties.

- **Trial** (:mod:`covey.coordinator.verify.trial_runs`). A new session's models are held
  (no jobs) until the miner answers a trial prompt greedily and the answer matches the
  reference for its weights hash, or, with no reference, passes a validator's re-check.
- **Sampled re-check.** After a job settles, a share of jobs (``CheckPolicy.rate``; text:
  ``chat_rate``) is re-checked by another miner with the same weights (a validator). The
  decision is made after the answer was delivered and nothing about the job differs, so a
  miner cannot tell which of its answers are checked.
- **Canary** (:mod:`covey.coordinator.verify.canaries`). After a share ``canary_rate`` of
  user text jobs, a covert greedy job goes out like a user's; every canary is re-checked.
- **Confirmation** (:mod:`covey.coordinator.verify.confirm`). A validator's failed verdict
  is confirmed by a second (and a third to break a tie) before any penalty; validators are
  paid per check whatever they report.
- **Penalty.** A failed check (or a usage fault seen by the coordinator) counts as a failure
  for reputation, slashes stake, refunds the user and stores the evidence
  (:func:`covey.coordinator.ledger.penalties.penalize`).
- **Floor.** A miner whose reputation drops below ``CheckPolicy.reputation_floor`` is held
  until it passes a trial again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from covey.coordinator.api.requests import new_id
from covey.coordinator.billing import Billing
from covey.coordinator.he_keys import KeyStore
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.ledger.penalties import Evidence, Penalty, penalize
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import (
    EmbedAnswer,
    ImageAnswer,
    Outcome,
    ScoreAnswer,
    ShardAnswer,
    SpeechAnswer,
    TextAnswer,
    TranscriptAnswer,
)
from covey.coordinator.router import Dispatcher
from covey.coordinator.verify.canaries import Canaries
from covey.coordinator.verify.confirm import Confirmation
from covey.coordinator.verify.embeddings import (
    MAX_PENDING_CHECKS,
    EmbeddingReference,
    EmbeddingVerification,
    load_references,
)
from covey.coordinator.verify.judge import CheckPolicy, Verdict, judge
from covey.coordinator.verify.media import MediaVerification
from covey.coordinator.verify.scores import ScoreVerification
from covey.coordinator.verify.shards import ShardVerification
from covey.coordinator.verify.trial_runs import CheckUnavailable, TrialRuns
from covey.coordinator.verify.trials import TrialBook
from covey.coordinator.verify.validators import VALIDATOR_ACCOUNT, borrow
from covey.protocol import (
    Check,
    CheckReport,
    Generate,
)

log = logging.getLogger("covey.coordinator.verify")

@dataclass(frozen=True)
class SealedAnswer:
    """What a validator needs to re-check a sealed job: the miner's sealed deltas
    (``stream``), how many token ids they hold (``tokens``), and ``key_for``, which asks
    the client to seal the session key to a validator's session (None: declined)."""

    stream: tuple[str, ...]
    tokens: int
    key_for: Callable[[MinerSession], Awaitable[str | None]]


class Verifier(TrialRuns, EmbeddingVerification, MediaVerification, ScoreVerification,
               ShardVerification, Confirmation):
    """Runs every check of one coordinator; see the module docstring."""

    def __init__(self, dispatcher: Dispatcher, billing: Billing, policy: CheckPolicy,
                 trials: TrialBook, metrics: Metrics,
                 embedding_references: dict[str, EmbeddingReference] | None = None) -> None:
        self.embedding_references = (load_references() if embedding_references is None
                                     else embedding_references)
        self.dispatcher = dispatcher
        self.billing = billing
        self.policy = policy
        self.trials = trials
        self.metrics = metrics
        # Seeded once from the OS: which job is re-checked stays unpredictable to miners
        # (they never see a draw), without a system call per job.
        self._rng = random.Random(random.SystemRandom().getrandbits(128))
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self.score_keys: KeyStore | None = None
        """Clients' evaluation keys, for re-checks of encrypted scores (set by the app)."""
        self.canaries: Canaries | None = None
        """The canary jobs' sender, when ``policy.canary_rate`` is above 0 (set by the
        app)."""
        dispatcher.registry.admission = self.admit
        dispatcher.scores.on_floor = (policy.reputation_floor, self.retrial)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop the checks under way and the canaries not sent yet (at shutdown)."""
        for task in self._tasks:
            task.cancel()
        if self.canaries is not None:
            self.canaries.close()

    # --- sampled re-checks -------------------------------------------------------------

    async def recheck(self, job: Generate, token_ids: Sequence[int], text: str, finish: str,
                      exclude: Sequence[str], sealed: SealedAnswer | None = None
                      ) -> tuple[CheckReport, str]:
        """Have a validator (a live miner with the job's weights, not in ``exclude``)
        measure an answer; returns its report and its miner id. For a sealed job,
        ``sealed`` holds the miner's sealed deltas, their token count, and how to get the
        session key sealed to the validator (``job`` is then the box the miner got, and
        ``token_ids`` / ``text`` are empty).

        Raises:
            CheckUnavailable: no validator is online or free within the timeout, or it
                failed.
        """
        d = self.dispatcher
        # Ahead of new requests, like a failover: checks are bounded by MAX_PENDING_CHECKS,
        # and new requests must not starve them.
        session = await borrow(d, job.model, job.model_sha256, exclude, self.policy.timeout,
                               CheckUnavailable)
        check = Check(job_id=new_id("chk"), job=job, token_ids=tuple(token_ids), text=text,
                      finish_reason="stop" if finish == "stop" else "length",
                      tail_q=self.policy.tail_q)
        tokens = len(token_ids)
        if sealed is not None:
            try:
                key = await sealed.key_for(session)
            except asyncio.CancelledError:
                d.release(session, VALIDATOR_ACCOUNT, job.model)
                raise
            except Exception:  # noqa: BLE001 - the client's channel failed under us
                key = None
            if key is None:
                d.release(session, VALIDATOR_ACCOUNT, job.model)
                raise CheckUnavailable("the client did not seal the key to a validator")
            check = check.model_copy(update={"sealed_key": key, "stream": sealed.stream})
            tokens = sealed.tokens
        try:
            async with asyncio.timeout(self.policy.timeout), \
                    MinerLink(session).call(check, self.policy.timeout) as call:
                item = await call.next()
        except TimeoutError:
            raise CheckUnavailable("the validator did not answer in time") from None
        except TaskRefused as exc:
            raise CheckUnavailable(f"the validator could not check: {exc}") from None
        except MinerFault as fault:
            raise CheckUnavailable("the validator could not check: " + (
                "it left" if fault.reason == "disconnected" else
                "it did not answer in time" if fault.reason == "stalled" else
                "it broke the protocol")) from None
        finally:
            d.release(session, VALIDATOR_ACCOUNT, job.model)
        assert isinstance(item, CheckReport)
        if len(item.gaps) != tokens + item.eos_checked:
            raise CheckUnavailable("the validator's report does not fit the answer")
        return item, session.miner_id

    def after_job(self, outcome: Outcome, settlement: Awaitable[object]) -> None:
        """A job finished and is settling: punish a false usage report, else maybe
        re-check it (share ``policy.rate``)."""
        answer, miner_id = outcome.answer, outcome.miner_id
        if miner_id is None or not outcome.checkable:
            return
        if isinstance(answer, EmbedAnswer):
            self._maybe_check_embedding(outcome, answer, settlement)
            return
        if isinstance(answer, TranscriptAnswer | SpeechAnswer | ImageAnswer):
            self._maybe_check_media(outcome, answer, settlement)
            return
        if isinstance(answer, ScoreAnswer):
            self._maybe_check_score(outcome, answer, settlement)
            return
        if isinstance(answer, ShardAnswer):
            self._maybe_check_shard(outcome, answer, settlement)
            return
        if answer is None or answer.finish_reason == "cancelled":
            return
        if outcome.fault is not None:
            self._spawn(self._usage(outcome, answer, settlement))
            return
        job = answer.sent
        # Answers that moved between miners, and penalized sampling (whose distribution
        # depends on history the validator does not model), are not re-checked.
        if outcome.failovers or job.params.presence_penalty or job.params.frequency_penalty:
            return
        canary = self.canaries is not None and self.canaries.is_canary(outcome.account)
        if not canary:
            if self.canaries is not None:
                self.canaries.after_user_job(outcome, lambda: self.has_validator(
                    job.model, job.model_sha256, miner_id))
            if self._rng.random() >= self.chat_rate:
                return
        if self._pending >= MAX_PENDING_CHECKS:
            self.metrics.checks.labels("sampled", "skipped").inc()
            return
        if job.model_sha256 is None:
            return
        sealed = None
        if job.sealed is not None:
            if answer.key_for is None:
                return
            sealed = SealedAnswer(tuple(answer.sealed_stream), answer.delivered,
                                  answer.key_for)
        self._pending += 1  # released when the check ends
        self._spawn(self._sampled(job, miner_id, list(answer.token_ids), answer.text,
                                  answer.finish_reason, outcome.prompt_tokens,
                                  outcome.account, settlement, sealed,
                                  "canary" if canary else "sampled"))

    @property
    def chat_rate(self) -> float:
        """Share of user text jobs re-checked (``policy.chat_rate``, else ``rate``)."""
        p = self.policy
        return p.rate if p.chat_rate is None else p.chat_rate

    async def _sampled(self, job: Generate, miner_id: str, ids: list[int], text: str,
                       finish: str, prompt_tokens: int, account: str,
                       settlement: Awaitable[object], sealed: SealedAnswer | None,
                       kind: str = "sampled") -> None:
        async def rejudge(exclude: Sequence[str]) -> tuple[Verdict, str | None]:
            report, validator = await self.recheck(job, ids, text, finish, exclude, sealed)
            return judge(self.policy, job, report, prompt_tokens), validator

        try:
            await settlement
            verdict, validator = await rejudge([miner_id])
        except CheckUnavailable as exc:
            self.metrics.checks.labels(kind, "skipped").inc()
            log.info("job %s not re-checked: %s", job.job_id, exc)
            return
        except Exception:  # noqa: BLE001 - the settlement logs its own failure
            return
        finally:
            self._pending -= 1
        self.paid(validator, job.job_id)
        self.metrics.checks.labels(kind, "passed" if verdict.passed else "failed").inc()
        if verdict.passed:
            return
        log.warning("job %s: miner %s failed a %s check by %s: %s", job.job_id,
                    miner_id[:16], kind, validator[:16] if validator else "?",
                    "; ".join(verdict.reasons))
        # A canary is the network's own job: nobody paid for it, nobody is refunded.
        await self.convict(Evidence(new_id("chk"), kind, job.job_id, miner_id,
                                    job.model_sha256 or "", verdict.as_dict(),
                                    None if kind == "canary" else account, validator),
                           rejudge)

    async def _usage(self, outcome: Outcome, answer: TextAnswer,
                     settlement: Awaitable[object]) -> None:
        try:
            await settlement
        except Exception:  # noqa: BLE001
            return
        assert outcome.miner_id is not None and outcome.fault is not None
        self.metrics.checks.labels("usage", "failed").inc()
        log.warning("job %s: miner %s reported false usage: %s", outcome.job_id,
                    outcome.miner_id[:16], outcome.fault)
        receipt = outcome.receipt[0].model_dump() if outcome.receipt else None
        verdict = {"passed": False, "reasons": [outcome.fault],
                   "figures": {"streamed_tokens": answer.delivered, "receipt": receipt}}
        await self.punish(Evidence(new_id("chk"), "usage", outcome.job_id, outcome.miner_id,
                                   outcome.offer.sha256 if outcome.offer else "", verdict,
                                   outcome.account, None))

    # --- penalties ---------------------------------------------------------------------

    async def punish(self, evidence: Evidence) -> Penalty | None:
        """Count a failed check against the miner and apply the penalty in the ledger."""
        self.dispatcher.scores.failure(evidence.miner_id)
        p = self.policy
        try:
            penalty = await self.billing.ledger_call(penalize, self.billing.bank, evidence,
                                                     p.slash_bps, p.validator_bps)
        except Exception:
            log.exception("penalty for check %s failed", evidence.check_id)
            return None
        if penalty is not None:
            self.metrics.slashed.inc(penalty.slashed)
            staked = await self.billing.ledger_call(self.billing.bank.staked,
                                                    evidence.miner_id)
            self.dispatcher.registry.set_stake(evidence.miner_id, staked)
            log.warning("miner %s penalized for %s check %s: slashed %d µcr (%d to the "
                        "validator), refunded %d µcr", evidence.miner_id[:16], evidence.kind,
                        evidence.check_id, penalty.slashed, penalty.to_validator,
                        penalty.refunded)
        return penalty
