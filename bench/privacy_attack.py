"""How much a fixed vocabulary permutation hides: attacks on private models, and their speed.

A private model's miner sees only permuted token ids. A fixed permutation is a substitution
cipher, so the classic attacks apply: rank the ids it sees by frequency and match them to a
public table of token frequencies, then refine the guess with which ids follow which
(:class:`Observer`, :func:`frequency_attack`). :func:`embedding_match` shows the stronger
attack open to anyone holding the public weights the private file was made from;
:func:`decode_speed` measures what the permutation costs.

Corpora (no network; all local, deterministic):

- **traffic** (what users send): the docstrings (module, class, function) of the Python
  standard library's ``.py`` files (``sysconfig.get_paths()["stdlib"]``, without
  :data:`SKIP_DIRS`), shuffled with a fixed seed, tokenized with the real SmolLM2 tokenizer
  and cut into requests of 200–400 tokens (1000 requests, ~300k tokens).
- **reference** (the attacker's public frequency table): ``pydoc_data.topics`` (the
  language reference's help pages) and the ``#`` comments of the same stdlib files (~390k
  tokens). No passage of text is in both corpora; the domain (Python's documentation) is
  shared, which makes the attacker's table better than a general-English one would be: a
  conservative test.

Usage: python bench/privacy_attack.py [--speed-rounds 3]
Prints a markdown table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import hashlib
import io
import json
import math
import os
import random
import sys
import sysconfig
import tempfile
import time
import tokenize
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from covey.miner.models import BUNDLED_MODEL, bundled_path
from covey.protocol.permutation import permutation

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "encodings"}
"""Tests (code samples, not prose), IDLE, a removed package, installed packages, and the
codecs, whose comments are tables of Unicode character names."""
REQUEST_TOKENS = (200, 400)
TOP = 100
SEED = 1234


def _stdlib_texts() -> tuple[list[str], list[str]]:
    """(docstrings, comments) of the stdlib's .py files, in a fixed order (comments: one
    text per file)."""
    docs: list[str] = []
    comments: list[str] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        src = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        docs.extend(d for node in ast.walk(tree)
                    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef
                                  | ast.AsyncFunctionDef) and (d := ast.get_docstring(node)))
        try:  # one text per file, a line per comment: lines end as docstrings' lines do
            comments.append("\n".join(t.string.lstrip("#").strip() for t in
                                      tokenize.generate_tokens(io.StringIO(src).readline)
                                      if t.type == tokenize.COMMENT))
        except (tokenize.TokenError, SyntaxError):
            continue
    return docs, comments


@dataclass(frozen=True)
class Corpus:
    """``requests``: lists of 200–400 real token ids of traffic; ``reference``: the token
    lists of the reference corpus (one per help page or comment); ``n_vocab``: tokens."""

    requests: list[list[int]]
    reference: list[list[int]]
    n_vocab: int


def corpus(plain_gguf: Path | None = None, n_requests: int = 1000, seed: int = SEED
           ) -> Corpus:
    """Both corpora (module docstring), tokenized by ``plain_gguf``'s vocabulary (default:
    the bundled SmolLM2). ~10 s on one core.

    Raises:
        ValueError: the traffic corpus is too small for ``n_requests``.
    """
    import pydoc_data.topics

    plain_gguf = plain_gguf or bundled_path(BUNDLED_MODEL)
    tok = llama_cpp.Llama(model_path=str(plain_gguf), vocab_only=True, verbose=False)
    try:
        docs, comments = _stdlib_texts()
        random.Random(seed).shuffle(docs)
        stream = [t for d in docs for t in tok.tokenize(d.encode() + b"\n\n", add_bos=False)]
        reference = [tok.tokenize(text.encode(), add_bos=False)
                     for text in [*pydoc_data.topics.topics.values(), *comments]]
        n_vocab = tok.n_vocab()
    finally:
        tok.close()
    rng = random.Random(seed + 1)
    requests, at = [], 0
    while len(requests) < n_requests:
        n = rng.randint(*REQUEST_TOKENS)
        if at + n > len(stream):
            raise ValueError(f"the traffic corpus holds only {len(requests)} requests")
        requests.append(stream[at: at + n])
        at += n
    return Corpus(requests, reference, n_vocab)


def _key(*label: object) -> bytes:
    """A deterministic stand-in for a user's random key (reproducible runs)."""
    return hashlib.sha256(repr((SEED, *label)).encode()).digest()


def _ranked(counts: Counter[int]) -> list[int]:
    """Ids, most frequent first (ties by id: a permuted id's order says nothing real)."""
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def _bigrams(streams: Iterable[Sequence[int]], index: dict[int, int], size: int) -> np.ndarray:
    """Counts of adjacent pairs of ids that are both in ``index`` (id → row)."""
    out = np.zeros((size, size))
    for s in streams:
        rows = [index.get(t, -1) for t in s]
        for a, b in zip(rows, rows[1:], strict=False):
            if a >= 0 and b >= 0:
                out[a, b] += 1
    return out


class Observer:
    """A miner (or anyone on its machine) guessing which real token each permuted id is.

    ``rank``: pair the i-th most frequent permuted id with the i-th most frequent token of
    the reference corpus (unigram frequency analysis). ``bigram``: start there and improve
    the guess for the ``OBSERVED`` most frequent ids by simulated annealing on the
    likelihood of the observed id pairs under the reference corpus's bigram model
    (log P(b | a), add-½ smoothed, over its ``CANDIDATES`` most frequent tokens): the
    classic way to break substitution ciphers.
    """

    OBSERVED = 150
    CANDIDATES = 300
    STEPS = 300_000

    def __init__(self, reference: Sequence[Sequence[int]], n_vocab: int) -> None:
        counts = Counter(t for s in reference for t in s)
        self.ranking = _ranked(counts) + [t for t in range(n_vocab) if t not in counts]
        self.cand = self.ranking[: self.CANDIDATES]
        pairs = _bigrams(reference, {t: i for i, t in enumerate(self.cand)}, len(self.cand))
        self.log_p = np.log((pairs + 0.5) / (pairs.sum(1, keepdims=True)
                                             + 0.5 * len(self.cand)))

    def guess(self, seen: Sequence[Sequence[int]], method: str) -> dict[int, int]:
        """Permuted id → guessed real id, from the permuted requests ``seen``."""
        ranked = _ranked(Counter(t for r in seen for t in r))
        guess = dict(zip(ranked, self.ranking, strict=False))
        if method == "bigram":
            obs = ranked[: self.OBSERVED]
            pairs = _bigrams(seen, {p: i for i, p in enumerate(obs)}, len(obs))
            sig = self._anneal(pairs, temperature=0.1 * len(seen))
            guess.update({p: self.cand[c] for p, c in zip(obs, sig, strict=True)})
        return guess

    def _anneal(self, pairs: np.ndarray, temperature: float) -> np.ndarray:
        """Candidate index per observed id maximizing Σ pairs[i, j]·log_p[σi, σj]
        (injective; moves: give id i candidate c, swapping with c's holder if any)."""
        m, c_n, lp = len(pairs), len(self.cand), self.log_p
        sig = np.arange(m)
        owner = np.full(c_n, -1)
        owner[:m] = sig
        rng = random.Random(SEED)

        def part(ids: list[int]) -> float:  # the score's terms that involve ids
            tot = sum(pairs[x] @ lp[sig[x], sig] + pairs[:, x] @ lp[sig, sig[x]] for x in ids)
            return tot - sum(pairs[x, y] * lp[sig[x], sig[y]] for x in ids for y in ids)

        for step in range(self.STEPS):
            t = temperature * (1 - step / self.STEPS)
            # half the moves swap two guesses; the others try a candidate from a window
            # that widens from the m most frequent to all of them
            i = rng.randrange(m)
            c = (sig[rng.randrange(m)] if rng.random() < 0.5
                 else rng.randrange(min(c_n, m + step * c_n // self.STEPS)))
            if c == sig[i]:
                continue
            j, a = owner[c], sig[i]
            ids = [i] if j < 0 else [i, j]
            before = part(ids)
            sig[i] = c
            if j >= 0:
                sig[j] = a
            delta = part(ids) - before
            if delta > 0 or (t > 0 and rng.random() < math.exp(max(delta / t, -50))):
                owner[a], owner[c] = j, i
            else:
                sig[i] = a
                if j >= 0:
                    sig[j] = c
        return sig


def recovered(requests: Sequence[Sequence[int]], perm: Sequence[int], observer: Observer,
              method: str, top: int = TOP) -> int:
    """How many of the ``top`` most frequent real tokens of ``requests`` the observer maps
    back correctly, seeing them permuted by ``perm``."""
    guess = observer.guess([[perm[t] for t in r] for r in requests], method)
    truth = _ranked(Counter(t for r in requests for t in r))[:top]
    return sum(guess.get(perm[t]) == t for t in truth)


def frequency_attack(data: Corpus, observed: Sequence[int] = (10, 100, 1000),
                     users: Sequence[int] = (10, 100), rotate_every: Sequence[int] = (100, 10),
                     max_keys: int = 5, top: int = TOP) -> dict[str, dict[str, float]]:
    """Both observers (``rank``, ``bigram``: :class:`Observer`) in three settings; numbers:
    of the ``top`` most frequent real tokens of what the observer saw under one key, how
    many it maps back correctly (a mean over the first ``max_keys`` keys where there are
    several). Keys: ``{method}/{setting}/{N}[/{k or R}]``.

    - ``one_key``: the first N requests (``observed``) under one fixed key;
    - ``per_user``: the first N = max(observed) requests split among k users (``users``),
      each with its own key; the observer tells users apart (the worst case) but cannot
      pool their ids;
    - ``rotation``: those N requests under one key rotated every R requests
      (``rotate_every``); the observer attacks each key's requests on their own.
    """
    observer = Observer(data.reference, data.n_vocab)
    reqs, n = data.requests, max(observed)
    runs: dict[str, list[tuple[Sequence[Sequence[int]], bytes]]] = {}
    for count in observed:
        runs[f"one_key/{count}"] = [(reqs[:count], _key("one"))]
    for k in users:
        runs[f"per_user/{n}/{k}"] = [(reqs[u:n:k], _key("user", u)) for u in range(k)]
    for r in rotate_every:
        runs[f"rotation/{n}/{r}"] = [(reqs[i: i + r], _key("epoch", i)) for i in range(0, n, r)]
    out: dict[str, dict[str, float]] = {"rank": {}, "bigram": {}}
    for method in out:
        for label, parts in runs.items():
            scores = [recovered(part, permutation(key, data.n_vocab), observer, method, top)
                      for part, key in parts[:max_keys]]
            out[method][label] = round(sum(scores) / len(scores), 1)
    return out


def embedding_match(plain_gguf: Path, private_gguf: Path) -> dict[str, float]:
    """The attack open to anyone with the public weights: match the private file's embedding
    rows to the plain file's byte for byte. Returns ``tokens`` (vocabulary size) and
    ``recovered`` (share of private ids whose row is unique and found, so their real token
    is known)."""
    import gguf

    def rows(path: Path) -> list[bytes]:
        t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
        return [bytes(r) for r in t.data]

    plain = rows(plain_gguf)
    where: dict[bytes, list[int]] = {}
    for i, row in enumerate(plain):
        where.setdefault(row, []).append(i)
    unique = sum(len(where.get(row, ())) == 1 for row in rows(private_gguf))
    return {"tokens": len(plain), "recovered": unique / len(plain)}


def decode_speed(plain_gguf: Path, private_gguf: Path, key: bytes, rounds: int = 3,
                 max_tokens: int = 64) -> dict[str, float]:
    """Decode tokens/s (median of ``rounds``) of the plain and the private model, one
    :class:`~covey.miner.backends.llama_cpp.LlamaCppBackend` each (1 slot, 1 thread),
    alternating runs, greedy, ``max_tokens`` tokens timed from the first to the last delta.
    """
    from covey.client.private import PrivateModel
    from covey.miner.backends.llama_cpp import LlamaCppBackend, LlamaCppConfig
    from covey.miner.models import ModelFile
    from covey.protocol import Delta, Job, SamplingParams
    from covey.protocol.frames import ChatMessage

    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    config = LlamaCppConfig(n_ctx=512, n_threads=1)
    with PrivateModel(key, plain_gguf) as pm:
        jobs = {"plain": Job(job_id="s", model="m", params=params,
                             messages=tuple(ChatMessage(**m) for m in messages)),
                "private": Job(job_id="s", model="m", params=params,
                               prompt_ids=tuple(pm.chat_ids(messages)),
                               stop_ids=())}  # no stop ids: both decode all max_tokens
    backends = {"plain": LlamaCppBackend(ModelFile("plain", plain_gguf), "0" * 64, 1, config),
                "private": LlamaCppBackend(ModelFile("private", private_gguf), "0" * 64, 1,
                                           config)}

    async def one(name: str) -> float:
        first = last = 0.0
        n = 0
        async for frame in backends[name].generate(jobs[name]):
            if isinstance(frame, Delta):
                last = time.perf_counter()
                first = first or last
                n += len(frame.token_ids)
        return (n - 1) / (last - first) if n > 1 and last > first else 0.0

    speeds: dict[str, list[float]] = {"plain": [], "private": []}

    async def alternate() -> None:
        for _ in range(rounds):
            for name in speeds:
                speeds[name].append(await one(name))

    try:
        # One event loop for all runs: a backend's slot queue belongs to the loop it
        # first ran on (a slot freed after asyncio.run closed its loop is never returned).
        asyncio.run(alternate())
    finally:
        for b in backends.values():
            b.close()
    med = {k: sorted(v)[len(v) // 2] for k, v in speeds.items()}
    return {"plain_tps": round(med["plain"], 1), "private_tps": round(med["private"], 1),
            "ratio": round(med["private"] / med["plain"], 3) if med["plain"] else 0.0}


def markdown(result: dict[str, dict[str, float]]) -> str:
    """The attack numbers (:func:`frequency_attack`) as a markdown table."""
    lines = ["| keys | requests seen per key | top-100 recovered: rank | bigram |",
             "| --- | --- | --- | --- |"]
    for label, rank in result["rank"].items():
        setting, *nums = label.split("/")
        if setting == "one_key":
            what, per_key = "one fixed key", nums[0]
        elif setting == "per_user":
            what, per_key = f"{nums[1]} users, own keys", str(int(nums[0]) // int(nums[1]))
        else:
            what, per_key = f"rotated every {nums[1]} requests", nums[1]
        lines.append(f"| {what} | {per_key} | {rank:g} | {result['bigram'][label]:g} |")
    return "\n".join(lines)


def run(speed_rounds: int = 3) -> dict[str, object]:
    """Everything this bench measures, as one dict (``rank`` / ``bigram``: the attack
    table, ``corpus``, ``embedding_match``, ``decode_speed`` unless ``speed_rounds`` is 0,
    ``seconds``); the attack table also goes to stderr as markdown."""
    started = time.perf_counter()
    plain = bundled_path(BUNDLED_MODEL)
    data = corpus(plain)
    attack = frequency_attack(data)
    print(markdown(attack), file=sys.stderr)
    result: dict[str, object] = dict(attack)
    result["corpus"] = {"requests": len(data.requests),
                        "traffic_tokens": sum(map(len, data.requests)),
                        "reference_tokens": sum(map(len, data.reference))}
    from covey.client.private_model import write_private_gguf

    with tempfile.TemporaryDirectory() as tmp:
        private = Path(tmp) / "private.gguf"
        write_private_gguf(plain, private, permutation(_key("file"), data.n_vocab))
        result["embedding_match"] = embedding_match(plain, private)
        if speed_rounds:
            result["decode_speed"] = decode_speed(plain, private, _key("file"), speed_rounds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed-rounds", type=int, default=3,
                        help="alternating decode runs per model (0: skip the speed test)")
    args = parser.parse_args()
    print(json.dumps(run(args.speed_rounds)))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
