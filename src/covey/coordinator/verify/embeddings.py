"""Verifying embedding miners: reference vectors for trials, a validator's vectors for
sampled re-checks, both compared by cosine similarity.

Embedding is deterministic up to float rounding: the bundled all-MiniLM-L6-v2 on this
machine gives vectors whose cosine distance across 1 and 2 threads and batches of 1 and 64
stays below 6e-8 (``bench/embeddings.py`` prints ``honest_max_distance``). A miner passes
when every vector has cosine ≥ :data:`EMBED_COSINE` to the reference (or the validator's)
and it counted the same input tokens; another model's vectors, or random ones, land far
below (the tests measure both).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from covey.coordinator.api.requests import new_id
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.ledger.penalties import Evidence
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.outcome import EmbedAnswer, Outcome
from covey.coordinator.router import Dispatcher
from covey.coordinator.verify.judge import CheckPolicy, Verdict
from covey.coordinator.verify.validators import NoVerdict, SampledChecks, validator
from covey.protocol import Embed, Embedded, ModelOffer
from covey.protocol.embed import cosine, unpack_vectors

log = logging.getLogger("covey.coordinator.verify")

MAX_PENDING_CHECKS = 16
"""Re-checks that may wait for or run on validators at once (see the checker's)."""

EMBED_COSINE = 0.999
"""Least cosine similarity an honest vector has to the reference: a cosine distance of
1e-3, over 10,000 times the largest honest distance measured here (6e-8), so other CPUs,
GPUs and half precision pass, while another model's vectors do not."""

TRIAL_INPUTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Photosynthesis turns light into chemical energy in plants.",
    "An open network where anyone can serve and use AI models.",
)
"""The inputs of an embedding trial; references hold their vectors."""


class EmbeddingUnavailable(NoVerdict):
    """The miner could not embed (refused, failed, left, or took too long)."""


@dataclass(frozen=True)
class EmbeddingReference:
    """Vectors of one model's weights for :data:`TRIAL_INPUTS` (same order)."""

    inputs: tuple[str, ...]
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


def load_references(extra: Sequence[Path] = ()) -> dict[str, EmbeddingReference]:
    """References by weights digest, from the bundled ``embedding_trials.json`` and
    ``extra`` files (JSON: ``{sha256: {"inputs", "vectors", "prompt_tokens"}}``).

    Raises:
        OSError, ValueError, KeyError: a file cannot be read or is not a reference file.
    """
    texts = [resources.files(__package__).joinpath("embedding_trials.json").read_text()]
    texts += [Path(p).read_text() for p in extra]
    out: dict[str, EmbeddingReference] = {}
    for text in texts:
        for sha, r in json.loads(text).items():
            ref = EmbeddingReference(tuple(r["inputs"]), tuple(tuple(v) for v in r["vectors"]),
                                     int(r["prompt_tokens"]))
            if len(ref.vectors) != len(ref.inputs):
                raise ValueError(f"embedding reference for {sha[:12]}… has "
                                 f"{len(ref.vectors)} vectors for {len(ref.inputs)} inputs")
            out[sha] = ref
    return out


def split_reference_files(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(text trial files, embedding reference files) among ``paths``: an embedding
    reference maps each digest to an object with ``vectors``, a text one to a list.

    Raises:
        OSError: a file cannot be read.
        ValueError: a file is not JSON.
    """
    text: list[Path] = []
    vectors: list[Path] = []
    for path in paths:
        book = json.loads(Path(path).read_text())
        is_vectors = isinstance(book, dict) and any(
            isinstance(v, dict) and "vectors" in v for v in book.values())
        (vectors if is_vectors else text).append(Path(path))
    return text, vectors


def compare(expected: Sequence[Sequence[float]], expected_tokens: int,
            got: Embedded, bound: float = EMBED_COSINE) -> Verdict:
    """Judge a miner's vectors (``got``) against trusted ones: fail on another count or
    length of vectors, a vector with cosine below ``bound``, or another token count."""
    verdict = Verdict()
    try:
        rows = unpack_vectors(got.vectors, got.dimensions)
    except ValueError as exc:
        verdict.reasons.append(f"the vectors do not decode: {exc}")
        return verdict
    if len(rows) != len(expected) or any(len(r) != len(e) for r, e in zip(rows, expected,
                                                                            strict=False)):
        verdict.reasons.append(f"{len(rows)} vectors of {got.dimensions} where "
                               f"{len(expected)} of {len(expected[0]) if expected else 0} "
                               "were due")
        return verdict
    cosines = [cosine(e, r) for e, r in zip(expected, rows, strict=True)]
    verdict.figures = {"min_cosine": round(min(cosines), 6), "bound": bound,
                       "prompt_tokens": got.prompt_tokens, "expected_tokens": expected_tokens}
    worst = min(range(len(cosines)), key=cosines.__getitem__)
    if cosines[worst] < bound:
        verdict.reasons.append(f"vector {worst} has cosine {cosines[worst]:.4f} to the "
                               f"trusted one (at least {bound} is due)")
    if got.prompt_tokens != expected_tokens:
        verdict.reasons.append(f"reported {got.prompt_tokens} input tokens; the trusted "
                               f"count is {expected_tokens}")
    return verdict


async def embed_on(session: MinerSession, task: Embed, timeout: float) -> Embedded:
    """Run ``task`` on ``session`` directly (a trial or a validator's re-run).

    Raises:
        EmbeddingUnavailable: the miner refused, failed, left or took over ``timeout`` s.
    """
    try:
        async with asyncio.timeout(timeout), \
                MinerLink(session).call(task, timeout) as call:
            reply = await call.next()
    except TimeoutError:
        raise EmbeddingUnavailable(f"no answer within {timeout:.0f} s") from None
    except TaskRefused as exc:
        raise EmbeddingUnavailable(f"the miner failed: {exc}") from None
    except MinerFault as fault:
        raise EmbeddingUnavailable(f"the miner could not embed ({fault.reason})") from None
    assert isinstance(reply, Embedded)
    return reply



class EmbeddingVerification(SampledChecks):
    """The :class:`~covey.coordinator.verify.checker.Verifier`'s part for embedding
    models: judging a trial, and the sampled re-check after a request."""

    dispatcher: Dispatcher
    policy: CheckPolicy
    metrics: Metrics
    embedding_references: dict[str, EmbeddingReference]
    _pending: int
    _rng: random.Random

    _spawn: Callable[[Awaitable[None]], None]
    punish: Callable[[Evidence], Awaitable[object]]

    async def _judge_embedding_trial(self, session: MinerSession, offer: ModelOffer,
                                     others: Sequence[str] = ()
                                     ) -> tuple[Verdict, str, str | None] | None:
        """Embed the trial inputs on ``session`` and judge them against the reference for
        the weights, or a validator's vectors (not ``others``'s) when there is none:
        (verdict, task id, validator id or None), or None when the miner did not answer."""
        ref = self.embedding_references.get(offer.sha256)
        task = Embed(job_id=new_id("emb"), model=offer.name, model_sha256=offer.sha256,
                     input=ref.inputs if ref else TRIAL_INPUTS)
        try:
            got = await embed_on(session, task, self.policy.timeout)
        except EmbeddingUnavailable:
            return None
        if ref is not None:
            return compare(ref.vectors, ref.prompt_tokens, got), task.job_id, None
        try:
            trusted, validator = await self._embed_by_validator(task, [session.miner_id,
                                                                       *others])
        except EmbeddingUnavailable as exc:
            verdict = Verdict(figures={"unverified": str(exc), "nobody": exc.nobody})
            return verdict, task.job_id, None
        rows = unpack_vectors(trusted.vectors, trusted.dimensions)
        return compare(rows, trusted.prompt_tokens, got), task.job_id, validator

    async def _embed_by_validator(self, task: Embed, exclude: Sequence[str]
                                  ) -> tuple[Embedded, str]:
        """``task`` embedded by a validator: a live miner with the same weights, not in
        ``exclude``, queued ahead of new requests.

        Raises:
            EmbeddingUnavailable: none is free within the timeout, or it failed.
        """
        async with validator(self.dispatcher, task.model, task.model_sha256, exclude,
                             self.policy.timeout, EmbeddingUnavailable) as session:
            again = task.model_copy(update={"job_id": new_id("chk")})
            return await embed_on(session, again, self.policy.timeout), session.miner_id

    def _maybe_check_embedding(self, outcome: Outcome, answer: EmbedAnswer,
                               settlement: Awaitable[object]) -> None:
        """After an embedding request: punish false usage, else re-check a share
        ``policy.rate`` of them on a validator."""
        assert outcome.miner_id is not None
        if outcome.fault is None and self._rng.random() >= self.policy.rate:
            return
        if outcome.fault is None and self._pending >= MAX_PENDING_CHECKS:
            self.metrics.checks.labels("sampled", "skipped").inc()
            return
        self._pending += 1
        self._spawn(self._sampled_embedding(outcome, answer, settlement))

    async def _sampled_embedding(self, outcome: Outcome, answer: EmbedAnswer,
                                 settlement: Awaitable[object]) -> None:
        async def recheck(exclude: Sequence[str]) -> tuple[Verdict, str | None]:
            trusted, validator_id = await self._embed_by_validator(answer.sent, exclude)
            rows = unpack_vectors(trusted.vectors, trusted.dimensions)
            got = Embedded(job_id=answer.sent.job_id, dimensions=answer.dimensions,
                           vectors=answer.vectors, prompt_tokens=outcome.prompt_tokens)
            return compare(rows, trusted.prompt_tokens, got), validator_id

        await self._sampled_single(outcome, answer.sent.model_sha256 or "", settlement, recheck)
