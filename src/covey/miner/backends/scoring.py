"""How well given tokens fit a model's logits: the validator's measurements for a re-check.

Pure numpy over a ``(positions, vocab)`` logits matrix, so any backend that can run a
teacher-forced prefill (llama.cpp here) reports the same statistics. The sampler modelled is
llama.cpp's chain as the llama.cpp backend configures it (llama-cpp-python
``Llama._init_sampler`` with ``top_k=0``, ``min_p=0``, ``typical_p=1``): top-p on the
untempered distribution, then temperature, then a draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LOGIT_SLACK = 1.0
"""Logits a token is given the benefit of before it counts as outside the top-p set.
Validator and miner compute logits in different batch shapes (one prefill versus
token-by-token decode), and on the bundled Q4_1 model the two differ by up to 0.9 logits on
some vocabulary entries (measured; the argmax moves far less), so a token at the edge of the
set may sit past it on one side."""

MASS_SLACK = 0.2
"""Share of the probability mass outside the top-p set that a token's more likely rivals may
also hold before it counts as outside: a token is inside while the mass of tokens more
likely than it (by :data:`LOGIT_SLACK`) stays below ``top_p + MASS_SLACK·(1 − top_p)``.
A random token of the vocabulary has nearly all the mass above it, so this costs the check
little."""

_TOP = 512  # candidates sorted per row before falling back to a full sort

CHERNOFF_LAMBDAS = (0.25, 0.5, 0.75, 0.9)
"""The λ grid of the log-likelihood tail bound (see :func:`token_stats`)."""


@dataclass(frozen=True)
class TokenStats:
    """Per-answer statistics (see :class:`covey.protocol.CheckReport` for their meaning)."""

    gaps: tuple[float, ...]
    outside: int
    tail_count: int
    tail_mass: float
    logq_sum: float = 0.0
    entropy_sum: float = 0.0
    variance_sum: float = 0.0
    chernoff: tuple[float, ...] = ()


def _top_p_threshold(p: np.ndarray, top_p: float) -> np.ndarray:
    """Per row, the smallest probability still inside the top-p set (shape ``(n,)``)."""
    n, vocab = p.shape
    k = min(_TOP, vocab)
    top = -np.sort(-np.partition(p, vocab - k, axis=1)[:, vocab - k:], axis=1)
    cum = np.cumsum(top, axis=1)
    out = np.empty(n, dtype=p.dtype)
    for i in range(n):
        row, c = top[i], cum[i]
        if c[-1] < top_p:  # the set is wider than the candidates: sort the whole row
            row = -np.sort(-p[i])
            c = np.cumsum(row)
        # llama.cpp keeps tokens until the cumulative mass reaches top_p (that one included)
        size = int(np.searchsorted(c, top_p)) + 1
        out[i] = row[min(size, len(row)) - 1]
    return out


def token_stats(logits: np.ndarray, tokens: np.ndarray, temperature: float, top_p: float,
                tail_q: float) -> TokenStats:
    """Score ``tokens`` (shape ``(n,)``) against ``logits`` (shape ``(n, vocab)``; row *i*
    is the distribution token *i* was drawn from).

    ``gaps``: top logit minus the token's logit per row (raw logits). For ``temperature``
    > 0 also: tokens outside the top-p set (with :data:`LOGIT_SLACK` and
    :data:`MASS_SLACK`), and of those inside,
    how many had q < ``tail_q`` under the renormalized tempered distribution q, against the
    expected number (sum of the q-mass below ``tail_q``), and for the log-likelihood test
    the sums over those tokens of log q(token), of the entropy H(q) and of Var[log q], and
    ``chernoff``: for each λ of :data:`CHERNOFF_LAMBDAS`, Σ log Σ_j q_j^(1−λ) (the log
    moment generating function of −log q), from which P(Σ log q ≤ observed) ≤
    min_λ exp(chernoff_λ + λ·Σ log q) for an honest sampler (Chernoff's bound).
    """
    logits = np.asarray(logits, dtype=np.float64)
    n = len(tokens)
    rows = np.arange(n)
    top = logits.max(axis=1)
    own = logits[rows, tokens]
    gaps = tuple(round(float(g), 4) for g in top - own)
    if temperature == 0 or n == 0:
        return TokenStats(gaps, 0, 0, 0.0)
    z = logits - top[:, None]
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if top_p < 1.0:
        above = (p * (p > p[rows, tokens][:, None] * np.exp(LOGIT_SLACK))).sum(axis=1)
        inside = above < top_p + MASS_SLACK * (1 - top_p)
        keep = p >= _top_p_threshold(p, top_p)[:, None]
        keep[rows, tokens] |= inside
    else:
        inside = np.ones(n, dtype=bool)
        keep = np.ones_like(p, dtype=bool)
    q = np.where(keep, np.exp(z / temperature), 0.0)
    q /= q.sum(axis=1, keepdims=True)
    low = keep & (q < tail_q)
    tail_mass = float((q * low).sum(axis=1)[inside].sum())
    tail_count = int((low[rows, tokens] & inside).sum())
    with np.errstate(divide="ignore"):
        logq = np.where(q > 0, np.log(np.where(q > 0, q, 1.0)), 0.0)
    entropy = -(q * logq).sum(axis=1)
    variance = (q * logq**2).sum(axis=1) - entropy**2
    kept = logq[inside]
    chernoff = tuple(
        float(np.log(np.where(keep[inside], np.exp((1 - lam) * kept), 0.0).sum(axis=1)).sum())
        for lam in CHERNOFF_LAMBDAS)
    return TokenStats(gaps, int((~inside).sum()), tail_count, tail_mass,
                      float(logq[rows, tokens][inside].sum()), float(entropy[inside].sum()),
                      float(variance[inside].sum()), chernoff)
