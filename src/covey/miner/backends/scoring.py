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

TOP_P_SLACK = 0.01
"""Extra probability mass allowed at the top-p boundary before a token counts as outside
the set: validator and miner compute logits in different batch shapes, so a token at the edge
of the set may sit just past it on one side."""

_TOP = 512  # candidates sorted per row before falling back to a full sort


@dataclass(frozen=True)
class TokenStats:
    """Per-answer statistics (see :class:`covey.protocol.CheckReport` for their meaning)."""

    gaps: tuple[float, ...]
    outside: int
    tail_count: int
    tail_mass: float


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
    > 0 also: tokens outside the top-p set (with :data:`TOP_P_SLACK`), and of those inside,
    how many had q < ``tail_q`` under the renormalized tempered distribution q, against the
    expected number (sum of the q-mass below ``tail_q``).
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
        above = (p * (p > p[rows, tokens][:, None])).sum(axis=1)
        inside = above < top_p + TOP_P_SLACK
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
    return TokenStats(gaps, int((~inside).sum()), tail_count, tail_mass)
