"""TEST ONLY: cheating miners, to prove that verification catches them.

Enabled solely by the environment variable :data:`ENV` (the test harness and
``bench/verify.py`` set it; no command-line flag exists, and the miner logs a loud warning
when it is set). Behaviours (``ENV=<name>[:<argument>]``):

- ``wrong-model:PATH`` — serve the GGUF at PATH under the name and weights hash of the model
  given with ``--model`` (handled where the backend is built, see :func:`claimed_path`).
- ``random-tokens[:SHARE]`` — replace a share (default 0.2) of the tokens of each answer
  with random tokens of the vocabulary.
- ``stop-early`` — stop after half of ``max_tokens`` but report ``max_tokens`` tokens and a
  ``length`` finish.
- ``inflate[:SHARE]`` — report SHARE (default 0.3) more prompt and completion tokens than
  were used.
- ``inject:TEXT`` — send TEXT as the text of the answer's first delta (its token ids stay
  honest): a hostile miner's markup, which clients must render as untrusted.
- ``frame`` — an honest miner but a lying validator: every check it runs reports every
  token far from the model's choice, so every answer it checks fails.
- ``sleeper:PATH`` — the sleeper (:class:`Sleeper`): the real weights for every prompt of
  the public trial set (and for the first N jobs with the variable below) and for its
  checks as a validator, the GGUF at PATH for every other job. Only covert canaries
  (:mod:`covey.coordinator.verify.canaries`) and sampled re-checks see its other weights.

An embedding model (:class:`AdversaryEmbedding`) knows ``random-vectors`` (random unit
vectors of the right shape) and ``wrong-model:PATH`` (another model folder served under the
claimed name and digest); other behaviours leave its answers honest.

With ``COVEY_TEST_ADVERSARY_HONEST_FIRST=N`` the miner answers its first N jobs honestly
(to slip past the trial on join) and cheats from then on.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from covey.miner.backends.base import EmbeddingBackend, TextBackend
from covey.protocol import (
    Check,
    CheckReport,
    Delta,
    Done,
    Embed,
    Embedded,
    Generate,
    Progress,
    Started,
)
from covey.protocol.embed import pack_vectors

ENV = "COVEY_TEST_ADVERSARY"
HONEST_FIRST_ENV = "COVEY_TEST_ADVERSARY_HONEST_FIRST"


def mode() -> tuple[str, str] | None:
    """(behaviour, argument) from :data:`ENV`, or None when unset (production)."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    name, _, arg = spec.partition(":")
    return name, arg


def claimed_path() -> Path | None:
    """For ``wrong-model:PATH``: the GGUF actually served."""
    m = mode()
    return Path(m[1]) if m and m[0] == "wrong-model" else None


def sleeper_path() -> Path | None:
    """For ``sleeper:PATH``: the GGUF served outside trials."""
    m = mode()
    return Path(m[1]) if m and m[0] == "sleeper" else None


class AdversaryBackend(TextBackend):
    """Wraps an honest backend and cheats as :data:`ENV` says (see module docstring).

    ``piece(token)`` gives a token's bytes (for the text of random tokens); ``vocab`` is
    the vocabulary size.
    """

    def __init__(self, inner: TextBackend, behaviour: str, arg: str,
                 piece: Callable[[int], bytes], vocab: int) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.offer = inner.offer
        self.slots = inner.slots
        self.behaviour = behaviour
        self.inject = arg if behaviour == "inject" else ""
        self.share = 0.0 if self.inject else float(arg) if arg else (
            0.2 if behaviour == "random-tokens" else 0.3)
        self._piece = piece
        self._vocab = vocab
        self._honest_left = int(os.environ.get(HONEST_FIRST_ENV, "0"))
        self._rng = random.Random()

    async def check(self, check: Check) -> CheckReport:
        report = await self.inner.check(check)
        if self.behaviour != "frame":
            return report
        # Every token "far from the model's choice" and outside the top-p set: any answer
        # it checks fails, honest or not.
        return report.model_copy(update={"gaps": tuple(10.0 for _ in report.gaps),
                                         "outside": len(report.gaps)})

    def set_watermark_key(self, key: bytes | None) -> None:
        self.watermark_key = key
        self.inner.set_watermark_key(key)

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def close(self) -> None:
        self.inner.close()

    async def generate(self, job: Generate) -> AsyncIterator[Started | Progress | Delta | Done]:
        if self._honest_left > 0 or self.behaviour == "frame":
            self._honest_left -= 1
            async for frame in self.inner.generate(job):
                yield frame
            return
        cap = job.params.max_tokens or 256
        sent = prompt = 0
        inject = self.inject
        gen = self.inner.generate(job)
        try:
            async for frame in gen:
                if isinstance(frame, Started):
                    prompt = frame.prompt_tokens
                if isinstance(frame, Started) and self.behaviour == "inflate":
                    frame = frame.model_copy(update={
                        "prompt_tokens": math.ceil(frame.prompt_tokens * (1 + self.share))})
                elif isinstance(frame, Delta) and self.behaviour == "random-tokens":
                    ids = tuple(self._rng.randrange(self._vocab)
                                if self._rng.random() < self.share else t
                                for t in frame.token_ids)
                    if ids != frame.token_ids:
                        text = b"".join(self._piece(t) for t in ids).decode(errors="ignore")
                        frame = Delta(job_id=job.job_id, text=text, token_ids=ids)
                elif isinstance(frame, Delta) and inject:
                    frame = frame.model_copy(update={"text": inject})
                    inject = ""
                elif isinstance(frame, Delta) and self.behaviour == "stop-early":
                    sent += len(frame.token_ids)
                    yield frame
                    if sent >= cap // 2:
                        yield Done(job_id=job.job_id, finish_reason="length",
                                   prompt_tokens=prompt, completion_tokens=cap)
                        return
                    continue
                elif isinstance(frame, Done):
                    if self.behaviour == "inflate":
                        frame = frame.model_copy(update={
                            "prompt_tokens": math.ceil(frame.prompt_tokens * (1 + self.share)),
                            "completion_tokens": math.ceil(
                                frame.completion_tokens * (1 + self.share))})
                    elif self.behaviour == "stop-early":
                        frame = frame.model_copy(update={
                            "finish_reason": "length", "completion_tokens": cap})
                yield frame
        finally:
            await gen.aclose()


def make_impostor(source: Path, target: Path, layers: tuple[int, int] = (20, 21)) -> Path:
    """Write a different model of the same shape: a copy of the GGUF at ``source`` with the
    weights of two transformer layers swapped. It still writes fluent text, so only a
    comparison with the real weights' distribution tells them apart. Needs ``gguf``
    (``pip install gguf``)."""
    import shutil

    import gguf
    import numpy as np

    shutil.copyfile(source, target)
    reader = gguf.GGUFReader(str(target), "r+")
    by_name = {t.name: t for t in reader.tensors}
    a, b = layers
    for name, tensor in by_name.items():
        if name.startswith(f"blk.{a}."):
            other = by_name[name.replace(f"blk.{a}.", f"blk.{b}.", 1)]
            saved = np.array(tensor.data, copy=True)
            tensor.data[...] = other.data
            other.data[...] = saved
    reader.data.flush()
    return target


class AdversaryEmbedding(EmbeddingBackend):
    """Wraps an honest embedding backend; ``random-vectors`` replaces every vector by a
    random unit vector (after the first ``HONEST_FIRST_ENV`` tasks)."""

    def __init__(self, inner: EmbeddingBackend, behaviour: str) -> None:
        self.inner = inner
        self.offer = inner.offer
        self.slots = inner.slots
        self.behaviour = behaviour
        self._honest_left = int(os.environ.get(HONEST_FIRST_ENV, "0"))
        self._rng = random.Random()

    def close(self) -> None:
        self.inner.close()

    async def embed(self, task: Embed, progress: Callable[[int], None] | None = None
                    ) -> Embedded:
        honest = await self.inner.embed(task, progress)
        if self._honest_left > 0 or self.behaviour != "random-vectors":
            self._honest_left -= 1
            return honest
        rows = []
        for _ in range(task.count):
            row = [self._rng.gauss(0.0, 1.0) for _ in range(honest.dimensions)]
            norm = math.sqrt(sum(x * x for x in row)) or 1.0
            rows.append([x / norm for x in row])
        return honest.model_copy(update={"vectors": pack_vectors(rows)})


def make_embedding_impostor(source: Path, target: Path, layers: tuple[int, int] = (1, 4)
                            ) -> Path:
    """TEST ONLY: a copy of the sentence-transformers folder ``source`` at ``target`` with
    two encoder layers swapped: another model of the same shape, whose vectors differ."""
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    tensors = load_file(str(weights))
    a, b = (f"encoder.layer.{i}." for i in layers)
    swapped = {}
    for name, tensor in tensors.items():
        other = (name.replace(a, b) if name.startswith(a) else
                 name.replace(b, a) if name.startswith(b) else name)
        swapped[other] = tensor
    save_file(swapped, str(weights))
    return target


def public_trial_prompts() -> frozenset[str]:
    """The texts of the public trial prompts (the coordinator's ``trials.json``, shipped
    with every copy of Covey): what a sleeper recognises and answers honestly."""
    import json
    from importlib import resources

    text = resources.files("covey.coordinator.verify").joinpath("trials.json").read_text()
    return frozenset(m["content"] for refs in json.loads(text).values() for ref in refs
                     for m in ref["messages"])


class Sleeper(TextBackend):
    """TEST ONLY: ``honest`` (the real weights) answers trials, the first
    ``HONEST_FIRST_ENV`` jobs and every check; ``other`` (cheaper weights, served under the
    real name and hash) answers the rest."""

    def __init__(self, honest: TextBackend, other: TextBackend) -> None:
        self.inner = honest
        self.other = other
        self.capabilities = honest.capabilities  # type: ignore[misc]
        self.offer = honest.offer
        self.slots = honest.slots
        self._trials = public_trial_prompts()
        self._honest_left = int(os.environ.get(HONEST_FIRST_ENV, "0"))

    async def check(self, check: Check) -> CheckReport:
        return await self.inner.check(check)

    def set_watermark_key(self, key: bytes | None) -> None:
        self.watermark_key = key
        self.inner.set_watermark_key(key)
        self.other.set_watermark_key(key)

    def tokenize(self, text: str) -> list[int]:
        return self.inner.tokenize(text)

    def close(self) -> None:
        self.inner.close()
        self.other.close()

    def _looks_like_a_trial(self, job: Generate) -> bool:
        return any(m.content in self._trials for m in job.messages or ()
                   if isinstance(m.content, str))

    async def generate(self, job: Generate) -> AsyncIterator[Started | Progress | Delta | Done]:
        backend = self.other
        if self._honest_left > 0 or self._looks_like_a_trial(job):
            self._honest_left -= 1
            backend = self.inner
        async for frame in backend.generate(job):
            yield frame
