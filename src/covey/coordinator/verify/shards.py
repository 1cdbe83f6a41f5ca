"""Re-checking a shard of a sharded model's answer: a validator holding the same blocks
replays the shard's recorded inputs and its output activations are compared.

After a chain's answer settles, a share ``policy.rate`` of them has one link that sends
hidden states (any but the last) picked at random. A live miner holding those blocks with
the same weights (never the checked one) runs them over the inputs the link got, in one
step from position 0; its output at every position must lie within
:data:`SHARD_TOLERANCE` (relative L2 distance) of what the link sent on. The coordinator
kept both for the rebuild of a failed link (a link's output is the next link's input), so
a check costs it nothing more until it runs, and the shard cannot tell a checked answer
from another. The last link, which sends tokens, is re-checked for greedy answers: the
validator scores the tokens it sampled at their positions, and each must be within the
text re-checks' ``greedy_gap`` of the validator's top logit. Sampled answers' last links,
and answers whose chain was rebuilt mid-answer, are not re-checked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from covey.coordinator.job_faults import MinerFault
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import Outcome, ShardAnswer, ShardLink
from covey.coordinator.router import Dispatcher
from covey.coordinator.shards import join_chunks
from covey.coordinator.verify.embeddings import MAX_PENDING_CHECKS
from covey.coordinator.verify.judge import CheckPolicy, Verdict
from covey.coordinator.verify.validators import NoVerdict, SampledChecks
from covey.protocol.shard import Forward, Forwarded, Tensor, tensor_values
from covey.protocol.wire import ShardRange

log = logging.getLogger("covey.coordinator.verify")

SHARD_TOLERANCE = 0.02
"""Largest relative L2 distance ‖validator − shard‖ / ‖validator‖ allowed at any position.
Measured on this machine for SmolLM2's first 15 blocks, a 67-position answer replayed in one
step against the decode steps it was sent in: 2.1e-6 in float32 and 2.4e-5 in float16. The
margin is for other hardware and bfloat16 (8 bits of mantissa: about 0.4% a value); noise of
5% of the activations' spread lands near 0.05."""

_ids = itertools.count(1)


class ShardVerification(SampledChecks):
    """The part of the :class:`~covey.coordinator.verify.checker.Verifier` that re-checks
    sharded answers."""

    dispatcher: Dispatcher
    policy: CheckPolicy
    metrics: Metrics
    _rng: random.Random
    _pending: int
    _spawn: Callable[[Awaitable[None]], None]

    def _maybe_check_shard(self, outcome: Outcome, answer: ShardAnswer,
                           settlement: Awaitable[object]) -> None:
        """After a chain's answer: re-check one link of a share ``policy.rate`` of them."""
        params = answer.job.params
        greedy = (params.temperature == 0 and not params.presence_penalty
                  and not params.frequency_penalty and bool(answer.sampled))
        # Links that send hidden states, and the last one when its tokens can be judged.
        checkable = len(answer.links) - (0 if greedy else 1)
        if outcome.failovers or checkable < 1:
            return
        if self._rng.random() >= self.policy.rate:
            return
        if self._pending >= MAX_PENDING_CHECKS:
            self.metrics.checks.labels("sampled", "skipped").inc()
            return
        index = self._rng.randrange(checkable)
        link = answer.links[index]
        checked = replace(outcome, miner_id=link.miner_id)
        self._pending += 1

        async def recheck(exclude: Sequence[str]) -> tuple[Verdict, str | None]:
            return await self._recheck_link(answer, index, exclude)

        self._spawn(self._sampled_single(checked, answer.sha256, settlement, recheck))

    async def _recheck_link(self, answer: ShardAnswer, index: int,
                            exclude: Sequence[str]) -> tuple[Verdict, str]:
        """Replay link ``index``'s inputs on a validator (not in ``exclude``, which holds
        the link's miner) and compare its outputs with the link's (the next link's
        inputs).

        Raises:
            NoVerdict: no validator holds those blocks, or it failed.
        """
        link = answer.links[index]
        last = index == len(answer.links) - 1
        session = self._shard_validator(answer, link, exclude)
        model = answer.job.model
        session.busy[model] = session.busy.get(model, 0) + 1
        sid = f"chk-shard-{next(_ids)}"
        try:
            async with asyncio.timeout(self.policy.timeout):
                outputs = await _replay(session, answer, link, sid, self.policy.timeout,
                                        answer.sampled if last else ())
        except (TimeoutError, MinerFault, TaskRefused) as exc:
            raise NoVerdict(f"the validator could not replay the shard: {exc}") from None
        finally:
            session.busy[model] = max(0, session.busy.get(model, 1) - 1)
            MinerLink(session).end_session(sid)
        if last:
            return judge_tokens(outputs[-1][2], self.policy.greedy_gap), session.miner_id
        after = answer.links[index + 1]
        return compare([(t, d) for t, d, _ in outputs], after.chunks), session.miner_id

    def _shard_validator(self, answer: ShardAnswer, link: ShardLink,
                         exclude: Sequence[str]) -> MinerSession:
        model = answer.job.model
        free, holders = [], 0
        for s in self.dispatcher.registry.sessions.values():
            o = s.shard_offer(model)
            if (s.closed or o is None or o.shard is None or s.miner_id == link.miner_id
                    or s.miner_id in exclude
                    or o.sha256 != answer.sha256 or o.shard.total != answer.total
                    or not o.shard.start <= link.start < link.end <= o.shard.end):
                continue
            holders += 1
            if s.busy.get(model, 0) < s.slots_for(model):
                free.append(s)
        if not free:
            raise NoVerdict(f"no other miner holds blocks {link.start}:{link.end} of "
                            f"{model} with a free slot", nobody=not holders)
        return min(free, key=lambda s: (s.busy.get(model, 0), s.miner_id))


async def _replay(session: MinerSession, answer: ShardAnswer, link: ShardLink, sid: str,
                  timeout: float, score: Sequence[int] = ()
                  ) -> list[tuple[Tensor, bytes, tuple[float, ...]]]:
    """The validator's outputs for every position of ``link``'s inputs (for the last
    link, the gaps of the ``score`` tokens at the last positions instead).

    Raises:
        NoVerdict: the validator answered out of shape.
    """
    job = answer.job
    blocks = ShardRange(start=link.start, end=link.end, total=answer.total)
    steps: list[dict[str, object]] = []
    if link.start == 0:
        steps.append({"messages": job.messages, "prompt": job.prompt,
                      "token_ids": link.tokens})
    else:
        for tensor, data in join_chunks(link.chunks):
            steps.append({"hidden": tensor, "data": data})
    out: list[tuple[Tensor, bytes, tuple[float, ...]]] = []
    position = 0
    for i, step in enumerate(steps):
        final = i == len(steps) - 1
        task = Forward(job_id=f"{sid}.{len(out)}", session=sid, model=job.model,
                       model_sha256=answer.sha256, blocks=blocks, position=position,
                       emit_from=position, params=job.params, sample=False,
                       score_ids=tuple(score) if final else (),
                       **step)  # type: ignore[arg-type]
        async with MinerLink(session).call(task, timeout) as call:
            reply = await call.next()
        assert isinstance(reply, Forwarded)
        if reply.hidden is None or (final and len(reply.gaps) != len(score)):
            raise NoVerdict("the validator's answer does not fit the replay")
        out.append((reply.hidden, reply.data, reply.gaps))
        position += reply.tokens
    return out


def judge_tokens(gaps: Sequence[float], greedy_gap: float) -> Verdict:
    """Judge a last shard's greedy tokens by a validator's ``gaps`` (its top logit minus
    each token's): each must be within ``greedy_gap`` logits, the text re-checks' bound
    (:class:`~covey.coordinator.verify.judge.CheckPolicy`)."""
    worst = max(gaps, default=0.0)
    verdict = Verdict(figures={"tokens": len(gaps), "max_gap": worst,
                               "greedy_gap": greedy_gap})
    wrong = [i for i, g in enumerate(gaps) if not g <= greedy_gap]
    if wrong:
        verdict.reasons.append(f"{len(wrong)} of {len(gaps)} greedy tokens are not the "
                               f"model's choice (largest gap {worst:.2f} logits)")
    return verdict


def _rows(chunks: Sequence[tuple[Tensor, bytes]]) -> list[Sequence[float]]:
    rows: list[Sequence[float]] = []
    for tensor, data in chunks:
        values = tensor_values(tensor, data)
        width = tensor.shape[-1]
        rows.extend(values[i:i + width] for i in range(0, len(values), width))
    return rows


def compare(trusted: Sequence[tuple[Tensor, bytes]], sent: Sequence[tuple[Tensor, bytes]]
            ) -> Verdict:
    """Judge a shard's outputs (``sent``) against a validator's (``trusted``) for the same
    inputs: the same positions and widths, each within :data:`SHARD_TOLERANCE`."""
    want, got = _rows(trusted), _rows(sent)
    verdict = Verdict(figures={"positions": len(want)})
    if len(want) != len(got) or any(len(a) != len(b) for a, b in zip(want, got, strict=False)):
        verdict.reasons.append(f"sent {len(got)} positions of hidden states where the "
                               f"validator computed {len(want)}")
        return verdict
    worst, at = 0.0, 0
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        norm = math.sqrt(sum(x * x for x in a)) or 1.0
        dist = math.sqrt(sum((x - y) * (x - y) for x, y in zip(a, b, strict=True))) / norm
        if dist > worst or math.isnan(dist):
            worst, at = dist, i
    verdict.figures.update({"max_relative_distance": worst, "at_position": at,
                            "tolerance": SHARD_TOLERANCE})
    if not worst <= SHARD_TOLERANCE:
        verdict.reasons.append(f"hidden states at position {at} are {worst:.4f} (relative "
                               f"L2) from the validator's, over {SHARD_TOLERANCE}")
    return verdict
