"""The green-list bias of :mod:`covey.protocol.watermark` over numpy logits.

One :class:`GreenList` per (key, vocabulary size) holds u over the vocabulary as a uint32
array, so the bias for one step is one add and one compare per vocabulary entry (about
0.1 ms for 49k entries) and the validator's bias for a whole answer is one broadcast.
"""

from __future__ import annotations

import functools

import numpy as np

from covey.protocol.watermark import DELTA, GAMMA, prev_offset, threshold, token_table


class GreenList:
    """Green masks and biased logits for ``key`` over a vocabulary of ``n_vocab`` tokens.

    ``delta`` (logits) and ``gamma`` (share) default to the paper's, as every miner of the
    network must use the same ones for the detector to find the watermark.
    """

    def __init__(self, key: bytes, n_vocab: int, delta: float = DELTA,
                 gamma: float = GAMMA) -> None:
        self.key = key
        self.delta = np.float32(delta)
        self.u = np.frombuffer(token_table(key, n_vocab), dtype="<u4").astype(np.uint32)
        self.limit = np.uint32(threshold(gamma))

    def mask(self, prev: int) -> np.ndarray:
        """Green tokens after ``prev``: bool array of shape ``(n_vocab,)``."""
        return (self.u + np.uint32(prev_offset(self.key, prev))) < self.limit

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """llama-cpp-python's logits-processor signature: ``scores`` (shape ``(n_vocab,)``)
        plus ``delta`` on the green tokens after the last of ``input_ids``, the token the
        next one follows."""
        return scores + self.delta * self.mask(int(input_ids[-1]))

    def bias_rows(self, logits: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """``logits`` (shape ``(n, n_vocab)``) plus ``delta`` on row *i*'s green tokens after
        ``prev[i]`` (shape ``(n,)``): what the sampler saw at each position of an answer."""
        offsets = np.array([prev_offset(self.key, int(p)) for p in prev], dtype=np.uint32)
        green = (self.u[None, :] + offsets[:, None]) < self.limit
        return logits + self.delta * green


@functools.lru_cache(maxsize=4)
def green_list(key: bytes, n_vocab: int) -> GreenList:
    """The :class:`GreenList` of ``key`` with the network's δ and γ (cached)."""
    return GreenList(key, n_vocab)
