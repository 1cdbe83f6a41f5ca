"""Trial tasks: known greedy prompts a miner answers before its first paid job.

A reference answer is kept per weights hash (SHA-256 of the GGUF): the greedy token ids and,
per position, the margin between the model's top two logits. A miner's answer passes when it
matches the reference up to its end, or up to a position where the reference itself was a
near tie (margin below :data:`TIE_MARGIN`): other CPUs and builds round differently and may
break such a tie the other way, after which the answers legitimately part. References are
recorded with ``covey trials record MODEL.gguf``; the bundled model's ships in
``trials.json`` next to this module.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

TIE_MARGIN = 0.5
"""Logit margin below which the reference's greedy choice is a near tie (see module doc).
Rounding differences between builds measured on the bundled model stay below 0.2 logits
(``bench/verify.py``'s ``honest_max_gap``)."""

TRIAL_MAX_TOKENS = 24
"""Tokens a trial answer is asked for: enough to tell models apart, short enough to cost a
fraction of a second."""

TRIAL_PROMPTS: tuple[tuple[dict[str, str], ...], ...] = tuple(
    ({"role": "user", "content": text},) for text in (
        "Count from one to ten in words.",
        "What is the boiling point of water in Celsius?",
        "Who wrote Romeo and Juliet?",
        "What is the largest ocean on Earth?",
        "What is the capital of France? Answer in one sentence.",
    ))
"""The trial prompts, as chat messages; references are recorded for each. Chosen for
answers the bundled model gives with clear margins (the first near tie comes after 7 to 24
tokens), so a trial compares many tokens before any tie can end the comparison."""


@dataclass(frozen=True)
class Reference:
    """The greedy answer of one model to one trial prompt: ``token_ids``, ``margins`` (top
    logit minus second logit at each position, with one more entry for the position after
    the last token when the answer ended on an end-of-generation token) and ``finish``."""

    messages: tuple[dict[str, str], ...]
    token_ids: tuple[int, ...]
    margins: tuple[float, ...]
    finish: str


def compare(ref: Reference, token_ids: Sequence[int], finish: str) -> str | None:
    """Why an answer differs from the reference beyond a near tie, or None when it passes."""
    for i, expected in enumerate(ref.token_ids):
        if i >= len(token_ids):
            if finish == "stop" and ref.margins[i] < TIE_MARGIN:
                return None  # the end token was a near tie with the reference's token
            return f"the answer ended after {i} tokens; the reference goes on"
        if token_ids[i] != expected:
            if ref.margins[i] < TIE_MARGIN:
                return None
            return (f"token {i} is {token_ids[i]}; the model's greedy choice is {expected} "
                    f"by a margin of {ref.margins[i]:.2f} logits")
    if len(token_ids) > len(ref.token_ids):
        if ref.finish == "stop" and ref.margins[len(ref.token_ids)] >= TIE_MARGIN:
            return f"the answer goes on past the reference's end at {len(ref.token_ids)} tokens"
    return None


class TrialBook:
    """Reference answers by weights hash, from the bundled file and any ``extra`` files
    (JSON: ``{sha256: [{"messages", "token_ids", "margins", "finish"}, …]}``).

    Raises (from the constructor):
        ValueError, KeyError, json.JSONDecodeError: a file is not such a reference file.
        OSError: a file cannot be read.
    """

    def __init__(self, extra: Sequence[Path] = (), bundled: bool = True) -> None:
        self.references: dict[str, list[Reference]] = {}
        texts = [resources.files(__package__).joinpath("trials.json").read_text()] \
            if bundled else []
        texts += [Path(p).read_text() for p in extra]
        for text in texts:
            for sha, refs in json.loads(text).items():
                for r in refs:
                    ref = Reference(tuple(r["messages"]), tuple(r["token_ids"]),
                                    tuple(r["margins"]), r["finish"])
                    if len(ref.margins) < len(ref.token_ids) + (ref.finish == "stop"):
                        raise ValueError(f"trial reference for {sha[:12]}… has "
                                         f"{len(ref.margins)} margins for "
                                         f"{len(ref.token_ids)} tokens")
                    self.references.setdefault(sha, []).append(ref)

    def plan(self, sha256: str) -> list[tuple[tuple[dict[str, str], ...], Reference | None]]:
        """The trial prompts for weights ``sha256``, each with its reference answer: every
        reference known (a miner must match them all), or one random prompt with None when
        none is known (a validator then checks the answer, if one is online)."""
        refs = self.references.get(sha256)
        if refs:
            return [(ref.messages, ref) for ref in refs]
        return [(random.choice(TRIAL_PROMPTS), None)]
