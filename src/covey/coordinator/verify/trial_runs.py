"""Trials on join: a new session's models are held (no jobs) until the miner answers the
trial greedily and the answer matches the reference for its weights hash, or, with no
reference, passes a validator's check (a failure then confirmed by a second validator,
:mod:`covey.coordinator.verify.confirm`). Failing refuses that model for the session;
a miner whose reputation fell below the floor is held for a trial again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from covey.coordinator.api.requests import new_id
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.ledger.penalties import Evidence
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import CLOSE_POLICY, MinerSession
from covey.coordinator.router import Dispatcher
from covey.coordinator.verify.judge import CheckPolicy, Verdict, judge
from covey.coordinator.verify.trials import TRIAL_MAX_TOKENS, TrialBook, compare
from covey.coordinator.verify.validators import NoVerdict
from covey.protocol import CheckReport, Delta, Done, Generate, ModelOffer, SamplingParams
from covey.protocol.frames import ChatMessage

log = logging.getLogger("covey.coordinator.verify")

TRIAL_ATTEMPTS = 3
"""Times a trial is tried when the miner does not answer (error, timeout) before the model is
refused for the session, unpunished: a slow start is not cheating."""
TRIAL_RETRY_S = 5.0


class CheckUnavailable(NoVerdict):
    """No validator could give a verdict (none online, busy, or it failed)."""


class TrialRuns:
    """The trial part of the :class:`~covey.coordinator.verify.checker.Verifier`."""

    dispatcher: Dispatcher
    policy: CheckPolicy
    trials: TrialBook
    metrics: Metrics
    _spawn: Callable[[Awaitable[None]], None]
    paid: Callable[[str | None, str], None]
    convict: Callable[..., Awaitable[bool]]
    recheck: Callable[..., Awaitable[tuple[CheckReport, str]]]
    _judge_embedding_trial: Callable[..., Awaitable[tuple[Verdict, str, str | None] | None]]
    _judge_media_trial: Callable[..., Awaitable[tuple[Verdict, str, str | None] | None]]
    _judge_score_trial: Callable[..., Awaitable[tuple[Verdict, str, str | None] | None]]
    _media_judgeable: Callable[[ModelOffer, str], bool]
    _score_judgeable: Callable[[ModelOffer, str], bool]
    embedding_references: dict

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
        return self.has_validator(offer.name, offer.sha256, miner_id)

    def has_validator(self, model: str, sha256: str | None, miner_id: str) -> bool:
        """Whether a live miner other than ``miner_id`` serves ``model`` with weights
        ``sha256`` (one could check ``miner_id``'s answers)."""
        return any(s.miner_id != miner_id and (o := s.offer(model)) is not None
                   and o.sha256 == sha256 for s in self.dispatcher.registry.serving(model))

    def retrial(self, miner_id: str) -> None:
        """The miner's reputation fell below the floor: hold it until it passes a trial."""
        session = self.dispatcher.registry.sessions.get(miner_id)
        # A miner on another replica is its owner's to hold: the owner sees the same
        # reputation (shared by the replicas) and announces the hold.
        if session is None or session.closed or not session.local or not self.policy.trials:
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
            self.paid(outcome[2], outcome[1])
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
                self.dispatcher.scores.lift(session.miner_id, self.policy.reputation_floor)
            return
        session.refused.add(offer.name)
        self.metrics.checks.labels("trial", "failed").inc()
        log.warning("miner %s failed its trial for %s: %s", session.miner_id[:16],
                    offer.name, "; ".join(verdict.reasons))

        async def rejudge(exclude: Sequence[str]) -> tuple[Verdict, str | None]:
            # The whole trial again, judged by a validator not asked yet.
            again = await self._judge_trial(session, offer, exclude[1:])
            if again is None:
                raise CheckUnavailable("the miner did not answer the trial again")
            verdict, _, validator_id = again
            if validator_id is None:
                raise CheckUnavailable(str(verdict.figures.get("unverified", "no validator")),
                                       nobody=bool(verdict.figures.get("nobody")))
            return verdict, validator_id

        # The model stays refused for this session either way: a miner accused unconfirmed
        # reconnects for a new trial.
        await self.convict(Evidence(new_id("chk"), "trial", job_id, session.miner_id,
                                    offer.sha256, verdict.as_dict(), None, validator), rejudge)
        await self._close_if_refused(session, f"failed its trial for {offer.name}")

    @staticmethod
    async def _close_if_refused(session: MinerSession, reason: str) -> None:
        """Disconnect a miner all of whose models are refused (it has nothing to serve)."""
        if all(m.name in session.refused for m in session.hello.models):
            with contextlib.suppress(Exception):
                await session.websocket.close(CLOSE_POLICY, reason[:120])

    async def _judge_trial(self, session: MinerSession, offer: ModelOffer,
                           others: Sequence[str] = ()
                           ) -> tuple[Verdict, str, str | None] | None:
        """Run the trial prompts for ``offer`` on ``session``, stopping at the first
        failure: (verdict, the last trial job's id, the validator's id if one judged; never
        one of ``others``), or None when the miner did not answer one (error, timeout,
        gone)."""
        if offer.kind == "embedding":
            return await self._judge_embedding_trial(session, offer, others)
        if offer.kind in ("transcription", "speech", "image"):
            return await self._judge_media_trial(session, offer, others)
        if offer.kind == "scoring":
            return await self._judge_score_trial(session, offer, others)
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
                    job, ids, text, done.finish_reason, exclude=[session.miner_id, *others])
            except CheckUnavailable as exc:
                # The first miner of weights nobody has a reference for: nothing to compare
                # with. Sampled re-checks apply once a second one joins.
                verdict.figures["unverified"] = str(exc)
                verdict.figures["nobody"] = exc.nobody
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
