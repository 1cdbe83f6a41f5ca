"""Green-list watermark: the keyed rule miners bias sampling with, and its detector.

Kirchenbauer, Geiping, Wen, Katz, Miers and Goldstein, "A Watermark for Large Language
Models", ICML 2023 (arXiv:2301.10226), soft watermark: before each token is sampled, the
vocabulary is split by a key and the previous token into a *green list* (a share γ of it)
and a red list, and δ is added to the logits of the green tokens. Text written that way has
far more green tokens than the share γ that text written without the key has, which the
one-proportion z-test of :func:`detect` finds from the token ids alone, without the model.

The split used here is cheap to vectorize over a vocabulary: with u(t) and v(p) 32-bit
numbers drawn from keyed BLAKE2b of the token t and of the previous token p, t is green
after p iff (u(t) + v(p)) mod 2³² < γ·2³². For a fixed p the green tokens are those whose
u falls in one window of width γ·2³², so a miner holds the table u over its vocabulary
(:func:`token_table`) and needs one add and one compare per vocabulary entry per step.
Because u is a keyed pseudo-random function, a token's colour is unpredictable without the
key, and each token is green with probability γ for any text chosen without it.

Standard library only, like the rest of :mod:`covey.protocol`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass

GAMMA = 0.25
"""Share of the vocabulary that is green after any token (the paper's γ = 0.25)."""
DELTA = 2.0
"""Logits added to green tokens before sampling (the paper's δ = 2.0)."""
Z_THRESHOLD = 4.0
"""z-score above which text is judged watermarked: the paper's threshold z = 4, a one-sided
false-positive rate of 3·10⁻⁵ for text written without the key."""
KEY_BYTES = 32
"""Length of a watermark key in bytes (its hex form has 64 characters)."""

_TOKEN_PERSON = b"covey-wm-token"  # BLAKE2b personalization: u(t)
_PREV_PERSON = b"covey-wm-prev"  # v(p): another function of the same key
_DERIVE_LABEL = b"covey-watermark-v1"
_SPACE = 2**32


def derive_key(seed: bytes) -> bytes:
    """The network's watermark key from the coordinator's Ed25519 seed (32 bytes):
    HMAC-SHA256(seed, ``b"covey-watermark-v1"``), so it is stable across restarts, needs no
    file of its own, and reveals nothing about the signing key."""
    return hmac.new(seed, _DERIVE_LABEL, hashlib.sha256).digest()


def parse_key(text: str) -> bytes:
    """A watermark key from its hex form (64 hex digits; surrounding whitespace ignored).

    Raises:
        ValueError: not hex, or not :data:`KEY_BYTES` bytes long.
    """
    key = bytes.fromhex(text.strip())
    if len(key) != KEY_BYTES:
        raise ValueError(f"a watermark key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits); "
                         f"got {len(key)} bytes")
    return key


def _hash32(key: bytes, person: bytes, value: int) -> int:
    digest = hashlib.blake2b(value.to_bytes(4, "little"), digest_size=4, key=key,
                             person=person).digest()
    return int.from_bytes(digest, "little")


def token_value(key: bytes, token: int) -> int:
    """u(``token``): the token's 32-bit number under ``key`` (0 ≤ token < 2³²)."""
    return _hash32(key, _TOKEN_PERSON, token)


def prev_offset(key: bytes, prev: int) -> int:
    """v(``prev``): the 32-bit shift of the green window after the token ``prev``."""
    return _hash32(key, _PREV_PERSON, prev)


def threshold(gamma: float = GAMMA) -> int:
    """γ·2³² rounded: (u(t) + v(p)) mod 2³² below it is green.

    Raises:
        ValueError: ``gamma`` is not strictly between 0 and 1.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must lie strictly between 0 and 1, got {gamma}")
    return min(_SPACE - 1, max(1, round(gamma * _SPACE)))


def is_green(key: bytes, prev: int, token: int, gamma: float = GAMMA) -> bool:
    """Whether ``token`` is on the green list after ``prev`` under ``key``."""
    return (token_value(key, token) + prev_offset(key, prev)) % _SPACE < threshold(gamma)


@functools.lru_cache(maxsize=8)
def token_table(key: bytes, n_vocab: int) -> bytes:
    """u(t) for t = 0 … ``n_vocab`` − 1 as little-endian uint32, ``4·n_vocab`` bytes (cached
    by key and vocabulary size; about 50 ms for a 50k vocabulary).

    A miner reads it with ``numpy.frombuffer(table, "<u4")``; the green mask after ``p`` is
    then ``(u + numpy.uint32(prev_offset(key, p))) < threshold(gamma)``, numpy's uint32
    addition wrapping modulo 2³² as the rule requires.
    """
    return b"".join(token_value(key, t).to_bytes(4, "little") for t in range(n_vocab))


@dataclass(frozen=True)
class Detection:
    """The outcome of :func:`detect`.

    ``tokens_scored``: T, the (previous, token) pairs scored; ``green_tokens``: g, how many
    of them are green; ``z_score``: (g − γT)/√(Tγ(1−γ)); ``p_value``: the one-sided chance
    that text written without the key scores at least ``z_score`` (normal tail).
    """

    tokens_scored: int
    green_tokens: int
    z_score: float
    p_value: float
    gamma: float

    @property
    def watermarked(self) -> bool:
        """z above :data:`Z_THRESHOLD` (the paper's verdict)."""
        return self.z_score > Z_THRESHOLD


def detect(key: bytes, token_ids: Sequence[int], gamma: float = GAMMA,
           unique: bool = True) -> Detection:
    """Score ``token_ids`` for the watermark of ``key``: each token after the first against
    the one before it, then the one-proportion z-test of the paper (§4):
    z = (g − γT)/√(Tγ(1−γ)) with p = ½·erfc(z/√2).

    ``unique`` scores each distinct (previous, token) pair once. A pair's colour is fixed by
    the key, so text that repeats a phrase repeats the same draw, and the z-test, which
    assumes independent draws, would call repetitive text written without the key
    watermarked one time in four or so; the authors' own detector has the same option
    (``ignore_repeated_bigrams``, github.com/jwkirchenbauer/lm-watermarking).

    Raises:
        ValueError: fewer than 2 tokens (nothing to score), or ``gamma`` out of (0, 1).
    """
    if len(token_ids) < 2:
        raise ValueError(f"at least 2 tokens are needed to score a watermark; got "
                         f"{len(token_ids)}")
    limit = threshold(gamma)
    pairs = list(zip(token_ids[:-1], token_ids[1:], strict=True))
    if unique:
        pairs = list(dict.fromkeys(pairs))
    offsets: dict[int, int] = {}
    values: dict[int, int] = {}
    green = 0
    for prev, token in pairs:
        v = offsets.get(prev)
        if v is None:
            v = offsets[prev] = prev_offset(key, prev)
        u = values.get(token)
        if u is None:
            u = values[token] = token_value(key, token)
        green += (u + v) % _SPACE < limit
    scored = len(pairs)
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    return Detection(tokens_scored=scored, green_tokens=green, z_score=z,
                     p_value=0.5 * math.erfc(z / math.sqrt(2)), gamma=gamma)
