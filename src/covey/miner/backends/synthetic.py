"""Synthetic backend, for load tests only: deterministic text at a set rate, no model.

It lets one machine stand in for a large network (a thousand miners in one process) and
measures the coordinator alone. Its output is not language: token *i* of an answer is a word
chosen by a hash of the request and *i*, so the same request always gives the same answer and
a failed-over job resumes exactly. Sampling settings other than ``max_tokens`` and ``stop``
are ignored (``watermark`` too: its text carries none). The model it announces is named
``synthetic`` by default and its "weights hash" is the SHA-256 of :data:`SYNTHETIC_WEIGHTS`,
so it can never pass for a real model.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import ClassVar

from covey.miner import harness
from covey.miner.backends.base import Capability, TextBackend
from covey.protocol import Check, CheckReport, Delta, Done, Generate, ModelOffer, Started
from covey.protocol.text import StreamDecoder

SYNTHETIC_WEIGHTS = b"covey synthetic backend v1"
"""Bytes whose SHA-256 stands for the synthetic model's weights hash."""

_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
          "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore",
          "magna", "aliqua", "enim", "ad", "minim", "veniam", "quis", "nostrud",
          "exercitation", "ullamco", "laboris", "nisi", "aliquip", "ex", "ea")
VOCAB = len(_WORDS)
_PIECES = tuple(f" {w}".encode() for w in _WORDS)


def _request_seed(job: Generate) -> int:
    """A stable 64-bit number from the request's text (not its id: equal requests give
    equal answers)."""
    h = hashlib.blake2b(digest_size=8)
    if job.messages is not None:
        for m in job.messages:
            h.update(m.role.encode() + b"\0" + m.content.encode() + b"\1")
    else:
        h.update((job.prompt or "").encode())
    return int.from_bytes(h.digest(), "big")


def token_at(seed: int, i: int) -> int:
    """Token id at position ``i`` (from 0) of the answer to a request with ``seed``."""
    return ((seed ^ (i * 0x9E3779B97F4A7C15)) * 0xBF58476D1CE4E5B9 >> 29) % VOCAB


def prompt_tokens(job: Generate) -> int:
    """Prompt length in synthetic tokens: one per 4 bytes of text, at least one (none for
    an empty prompt); token ids count as given."""
    if job.prompt_ids is not None:
        return len(job.prompt_ids)
    if job.prompt == "":
        return 0
    if job.messages is not None:
        n = sum(len(m.content.encode()) + 4 for m in job.messages)
    else:
        n = len((job.prompt or "").encode())
    return max(1, n // 4)


class SyntheticBackend(TextBackend):
    """``tokens_per_second`` per job (0: as fast as possible), ``slots`` jobs at once.

    Tokens due are sent together every ``stream_interval`` seconds, so thousands of streams
    cost a few wake-ups each per second, like the real backend's frame batching.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset(
        {"generate", "validate", "tokenize"})

    def __init__(self, name: str = "synthetic", slots: int = 64,
                 tokens_per_second: float = 50.0, context_length: int = 4096,
                 stream_interval: float = 0.02) -> None:
        self.slots = slots
        self._rate = tokens_per_second
        self._interval = stream_interval
        self.offer = ModelOffer(name=name, sha256=hashlib.sha256(SYNTHETIC_WEIGHTS).hexdigest(),
                                context_length=context_length, backend="synthetic")

    async def generate(self, job: Generate) -> AsyncIterator[Started | Delta | Done]:
        n_prompt = prompt_tokens(job)
        max_new = harness.admit(job, n_prompt, self.offer.context_length, VOCAB)
        yield Started(job_id=job.job_id, prompt_tokens=n_prompt)
        seed = _request_seed(job)
        start = len(job.resume.token_ids) if job.resume else 0
        end = start + max_new
        decoder = harness.decoder_for(job, _PIECES.__getitem__)
        began = time.monotonic()
        i, finish = start, "stop" if decoder.stopped else "length"
        while i < end and finish == "length":
            due = end if not self._rate else min(
                end, start + 1 + int((time.monotonic() - began) * self._rate))
            texts: list[str] = []
            ids: list[int] = []
            while i < due:
                token = token_at(seed, i)
                i += 1
                texts.append(decoder.feed(_PIECES[token]))
                ids.append(token)
                if decoder.stopped:
                    finish = "stop"
                    break
            if i >= end or finish == "stop":
                texts.append(decoder.finish())
            if ids or any(texts):
                yield Delta(job_id=job.job_id, text="".join(texts), token_ids=tuple(ids))
            if i < end and finish == "length":
                await asyncio.sleep(max(self._interval, 1 / self._rate if self._rate else 0))
        yield Done(job_id=job.job_id, finish_reason=finish, prompt_tokens=n_prompt,
                   completion_tokens=i - start)

    def tokenize(self, text: str) -> list[int]:
        """One token per whitespace-separated word: a vocabulary word's id, any other word
        a stable id from its hash (so text of any kind gets a score)."""
        return [_WORDS.index(w) if w in _WORDS else
                int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest()) % VOCAB
                for w in text.split()]

    async def check(self, check: Check) -> CheckReport:
        """Re-check by recomputing the answer: every token has one right value, so a wrong
        one has gap 10 and counts as outside the (one-token) sampling set."""
        job = check.job
        seed = _request_seed(job)
        decoder = StreamDecoder(job.params.stop)
        text = "".join(decoder.feed(_PIECES[t]) for t in check.token_ids
                       if 0 <= t < VOCAB) + decoder.finish()
        gaps = tuple(0.0 if t == token_at(seed, i) else 10.0
                     for i, t in enumerate(check.token_ids))
        return CheckReport(job_id=check.job_id, prompt_tokens=prompt_tokens(job),
                           text_matches=text == check.text
                           and all(0 <= t < VOCAB for t in check.token_ids),
                           gaps=gaps, outside=sum(g > 0 for g in gaps))
