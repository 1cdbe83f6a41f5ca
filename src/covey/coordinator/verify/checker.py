"""The verification scheduler: trials on join, sampled re-checks, usage faults, penalties.

- **Trial.** A new session's models are held (no jobs) until the miner answers a trial
  prompt greedily and the answer matches the reference for its weights hash, or, with no
  reference, passes a validator's re-check. Failing refuses that model for the session.
- **Sampled re-check.** After a job settles, a share ``CheckPolicy.rate`` of jobs is
  re-checked by another miner with the same weights (a validator). The decision is made
  after the answer was delivered and nothing about the job differs, so a miner cannot tell
  which of its answers are checked.
- **Penalty.** A failed check (or a usage fault seen by the coordinator) counts as a failure
  for reputation, slashes stake, pays the validator, refunds the user and stores the
  evidence (:func:`covey.coordinator.ledger.penalties.penalize`).
- **Floor.** A miner whose reputation drops below ``CheckPolicy.reputation_floor`` is held
  until it passes a trial again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from covey.coordinator.api.requests import new_id
from covey.coordinator.billing import Billing
from covey.coordinator.errors import ApiError
from covey.coordinator.he_keys import KeyStore
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.ledger.penalties import Evidence, Penalty, penalize
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import CLOSE_POLICY, MinerSession
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
from covey.coordinator.verify.trials import TRIAL_MAX_TOKENS, TrialBook, compare
from covey.coordinator.verify.validators import VALIDATOR_ACCOUNT
from covey.protocol import (
    Check,
    CheckReport,
    Delta,
    Done,
    Generate,
    ModelOffer,
    SamplingParams,
)
from covey.protocol.frames import ChatMessage

log = logging.getLogger("covey.coordinator.verify")

TRIAL_ATTEMPTS = 3
"""Times a trial is tried when the miner does not answer (error, timeout) before the model is
refused for the session, unpunished: a slow start is not cheating."""
TRIAL_RETRY_S = 5.0



@dataclass(frozen=True)
class SealedAnswer:
    """What a validator needs to re-check a sealed job: the miner's sealed deltas
    (``stream``), how many token ids they hold (``tokens``), and ``key_for``, which asks
    the client to seal the session key to a validator's session (None: declined)."""

    stream: tuple[str, ...]
    tokens: int
    key_for: Callable[[MinerSession], Awaitable[str | None]]


class CheckUnavailable(Exception):
    """No validator could give a verdict (none online, busy, or it failed)."""


class Verifier(EmbeddingVerification, MediaVerification, ScoreVerification,
               ShardVerification):
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
        self._rng = random.SystemRandom()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending = 0
        self.score_keys: KeyStore | None = None
        """Clients' evaluation keys, for re-checks of encrypted scores (set by the app)."""
        dispatcher.registry.admission = self.admit
        dispatcher.scores.on_floor = (policy.reputation_floor, self.retrial)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        """Stop the checks under way (at shutdown)."""
        for task in self._tasks:
            task.cancel()

    # --- trials ------------------------------------------------------------------------

    def admit(self, session: MinerSession) -> None:
        """Hold each model of a new session until it passes its trial.

        Weights with no reference answer are admitted at once while no other miner serves
        them (nothing could judge the answer; sampled re-checks start once a second one
        joins), and otherwise checked by such a miner as validator. Private models are
        admitted untried: trial prompts are text, which their miners cannot read (sampled
        re-checks of their jobs still run).
        """
        if not self.policy.trials:
            return
        for offer in session.hello.models:
            if offer.private or offer.shard is not None:
                log.info("miner %s admitted for %s model %s without a trial (%s)",
                         session.miner_id[:16], "private" if offer.private else "a shard of",
                         offer.name, "trial prompts are text" if offer.private
                         else "a shard alone cannot answer a prompt")
                self.metrics.checks.labels("trial", "skipped").inc()
                continue
            if not self._judgeable(offer, session.miner_id):
                log.info("miner %s admitted for %s unverified: no reference answer for "
                         "weights %s and no other miner serving them", session.miner_id[:16],
                         offer.name, offer.sha256[:12])
                self.metrics.checks.labels("trial", "skipped").inc()
                continue
            session.held.add(offer.name)
            self._spawn(self._trial(session, offer))

    def _judgeable(self, offer: ModelOffer, miner_id: str) -> bool:
        """Whether a trial answer for ``offer`` could be judged: a reference exists, or a
        live miner other than ``miner_id`` serves the same weights."""
        if offer.kind in ("transcription", "speech", "image"):
            return self._media_judgeable(offer, miner_id)
        if offer.kind == "scoring":
            return self._score_judgeable(offer, miner_id)
        if offer.sha256 in (self.embedding_references if offer.kind == "embedding"
                            else self.trials.references):
            return True
        return any(s.miner_id != miner_id and (o := s.offer(offer.name)) is not None
                   and o.sha256 == offer.sha256
                   for s in self.dispatcher.registry.serving(offer.name))

    def retrial(self, miner_id: str) -> None:
        """The miner's reputation fell below the floor: hold it until it passes a trial."""
        session = self.dispatcher.registry.sessions.get(miner_id)
        if session is None or session.closed or not self.policy.trials:
            return
        log.warning("miner %s fell below the reputation floor; holding it for a trial",
                    miner_id[:16])
        for offer in session.hello.models:
            if offer.private or offer.shard is not None:  # no text trial can run
                log.warning("miner %s keeps serving private model %s untried",
                            miner_id[:16], offer.name)
                continue
            if offer.name not in session.held and offer.name not in session.refused:
                session.held.add(offer.name)
                self._spawn(self._trial(session, offer, again=True))
        self.dispatcher.registry.notify()

    async def _trial(self, session: MinerSession, offer: ModelOffer, again: bool = False
                     ) -> None:
        try:
            async with asyncio.timeout(self.policy.timeout):
                await session.welcomed.wait()
            # A re-trial waits for the jobs still running there: the trial needs a free slot
            # (no new job arrives while the model is held).
            while session.busy.get(offer.name, 0) and not session.closed:
                await asyncio.sleep(0.2)
            outcome = None
            for _ in range(TRIAL_ATTEMPTS):
                if session.closed:
                    return
                outcome = await self._judge_trial(session, offer)
                if outcome is not None:
                    break
                await asyncio.sleep(TRIAL_RETRY_S)
            if session.closed:
                return
            if outcome is None:
                # No answer to judge (errors, timeouts): not admitted, not punished.
                session.refused.add(offer.name)
                self.metrics.checks.labels("trial", "skipped").inc()
                log.warning("miner %s could not complete its trial for %s",
                            session.miner_id[:16], offer.name)
                await self._close_if_refused(session, "could not complete its trial for "
                                             f"{offer.name}")
                return
            await self._trial_verdict(session, offer, again, *outcome)
        except TimeoutError:  # the session never got its welcome
            return
        finally:
            session.held.discard(offer.name)
            self.dispatcher.registry.notify()

    async def _trial_verdict(self, session: MinerSession, offer: ModelOffer, again: bool,
                             verdict: Verdict, job_id: str, validator: str | None) -> None:
        if verdict.passed:
            self.metrics.checks.labels("trial", "passed").inc()
            log.info("miner %s passed its trial for %s%s", session.miner_id[:16], offer.name,
                     " (no reference or validator: unverified)"
                     if "unverified" in verdict.figures else "")
            if again:
                score = self.dispatcher.scores.get(session.miner_id)
                score.reputation = max(score.reputation, self.policy.reputation_floor)
            return
        session.refused.add(offer.name)
        self.metrics.checks.labels("trial", "failed").inc()
        log.warning("miner %s failed its trial for %s: %s", session.miner_id[:16],
                    offer.name, "; ".join(verdict.reasons))
        await self.punish(Evidence(new_id("chk"), "trial", job_id, session.miner_id,
                                   offer.sha256, verdict.as_dict(), None, validator))
        await self._close_if_refused(session, f"failed its trial for {offer.name}")

    @staticmethod
    async def _close_if_refused(session: MinerSession, reason: str) -> None:
        """Disconnect a miner all of whose models are refused (it has nothing to serve)."""
        if all(m.name in session.refused for m in session.hello.models):
            with contextlib.suppress(Exception):
                await session.websocket.close(CLOSE_POLICY, reason[:120])

    async def _judge_trial(self, session: MinerSession, offer: ModelOffer
                           ) -> tuple[Verdict, str, str | None] | None:
        """Run the trial prompts for ``offer`` on ``session``, stopping at the first
        failure: (verdict, the last trial job's id, the validator's id if one judged), or
        None when the miner did not answer one (error, timeout, gone)."""
        if offer.kind == "embedding":
            return await self._judge_embedding_trial(session, offer)
        if offer.kind in ("transcription", "speech", "image"):
            return await self._judge_media_trial(session, offer)
        if offer.kind == "scoring":
            return await self._judge_score_trial(session, offer)
        verdict = Verdict()
        job_id, validator = "", None
        for messages, ref in self.trials.plan(offer.sha256):
            job = Generate(job_id=new_id("chatcmpl"), model=offer.name, model_sha256=offer.sha256,
                      messages=tuple(ChatMessage(**m) for m in messages),
                      params=SamplingParams(temperature=0, max_tokens=TRIAL_MAX_TOKENS))
            job_id = job.job_id
            try:
                ids, text, done = await self._run(session, job)
            except CheckUnavailable as exc:
                log.info("trial of miner %s: %s", session.miner_id[:16], exc)
                return None
            verdict.figures = {"prompt": messages[-1]["content"], "token_ids": ids[:64],
                               "finish": done.finish_reason}
            if ref is not None:
                verdict.figures["reference"] = list(ref.token_ids)
                reason = compare(ref, ids, done.finish_reason)
                if reason:
                    verdict.reasons.append(reason)
                    return verdict, job_id, None
                continue
            try:
                report, validator = await self.recheck(
                    job, ids, text, done.finish_reason, exclude=[session.miner_id])
            except CheckUnavailable as exc:
                # The first miner of weights nobody has a reference for: nothing to compare
                # with. Sampled re-checks apply once a second one joins.
                verdict.figures["unverified"] = str(exc)
                return verdict, job_id, None
            verdict = judge(self.policy, job, report, done.prompt_tokens)
            return verdict, job_id, validator
        return verdict, job_id, validator

    async def _run(self, session: MinerSession, job: Generate) -> tuple[list[int], str, Done]:
        """Run ``job`` on ``session`` directly (outside routing) and collect the answer.

        Raises:
            CheckUnavailable: the miner refused, failed, left or took too long.
        """
        ids: list[int] = []
        text: list[str] = []
        try:
            async with asyncio.timeout(self.policy.timeout), \
                    MinerLink(session).call(job, self.policy.timeout) as call:
                async for item in call:
                    if isinstance(item, Delta):
                        ids.extend(item.token_ids)
                        text.append(item.text)
                    elif isinstance(item, Done):
                        return ids, "".join(text), item
        except TimeoutError:
            raise CheckUnavailable(f"no answer within {self.policy.timeout:.0f} s") from None
        except TaskRefused as exc:
            raise CheckUnavailable(f"the miner failed: {exc}") from None
        except MinerFault as fault:
            raise CheckUnavailable({"disconnected": "the miner left", "stalled":
                                    f"no answer within {self.policy.timeout:.0f} s"}.get(
                fault.reason, "the miner broke the protocol")) from None
        raise CheckUnavailable("the miner broke the protocol")  # ended without a done

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
        try:
            async with asyncio.timeout(self.policy.timeout):
                # Ahead of new requests, like a failover: checks are bounded by
                # MAX_PENDING_CHECKS, and new requests must not starve them.
                session = await d.acquire(job.model, VALIDATOR_ACCOUNT, job.model_sha256,
                                          frozenset(exclude), priority=True)
        except (ApiError, TimeoutError) as exc:
            raise CheckUnavailable(getattr(exc, "message", "no validator was free")) from None
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
        if self._rng.random() >= self.policy.rate:
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
                                  outcome.account, settlement, sealed))

    async def _sampled(self, job: Generate, miner_id: str, ids: list[int], text: str,
                       finish: str, prompt_tokens: int, account: str,
                       settlement: Awaitable[object], sealed: SealedAnswer | None) -> None:
        try:
            await settlement
            report, validator = await self.recheck(job, ids, text, finish, [miner_id],
                                                   sealed)
        except CheckUnavailable as exc:
            self.metrics.checks.labels("sampled", "skipped").inc()
            log.info("job %s not re-checked: %s", job.job_id, exc)
            return
        except Exception:  # noqa: BLE001 - the settlement logs its own failure
            return
        finally:
            self._pending -= 1
        verdict = judge(self.policy, job, report, prompt_tokens)
        self.metrics.checks.labels("sampled", "passed" if verdict.passed else "failed").inc()
        if verdict.passed:
            return
        log.warning("job %s: miner %s failed a re-check by %s: %s", job.job_id, miner_id[:16],
                    validator[:16], "; ".join(verdict.reasons))
        await self.punish(Evidence(new_id("chk"), "sampled", job.job_id, miner_id,
                                   job.model_sha256 or "", verdict.as_dict(), account,
                                   validator))

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
