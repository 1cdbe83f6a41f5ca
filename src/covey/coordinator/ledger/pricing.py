"""Prices and settlement arithmetic, in integer micro-credits (µcr). Pure functions.

A price is µcr per 1,000,000 tokens, separately for prompt and completion tokens (the unit
OpenAI and most providers quote). Costs round up to whole µcr so no non-empty request is free;
the protocol fee is a share in basis points (1/10,000) of what the miner earns, rounded down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PER = 1_000_000
BPS = 10_000


@dataclass(frozen=True)
class Price:
    """µcr per 1M prompt tokens and per 1M completion tokens."""

    prompt: int
    completion: int


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cost(price: Price, prompt_tokens: int, completion_tokens: int) -> int:
    """What a request of this many tokens costs, in µcr (rounded up)."""
    return _ceil_div(prompt_tokens * price.prompt + completion_tokens * price.completion, PER)


@dataclass(frozen=True)
class Settlement:
    """How an escrow of ``held`` µcr is closed: ``miner`` + ``fee`` + ``refund`` = held."""

    miner: int
    fee: int
    refund: int


def settle(held: int, charge: int, fee_bps: int) -> Settlement:
    """Split ``held`` µcr: the ``charge`` (capped at ``held``) goes to the miner less the fee
    (``fee_bps`` basis points of it, to the treasury); the rest is refunded."""
    charge = max(0, min(charge, held))
    fee = charge * fee_bps // BPS
    return Settlement(miner=charge - fee, fee=fee, refund=held - charge)


def split(amount: int, weights: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """``amount`` µcr shared among ``weights`` (miner id, blocks served) in proportion,
    in whole µcr: each gets the floor of its share and the µcr left over go one each to
    the largest remainders (Hamilton's method), ties to the earlier entry, so the parts
    always sum to ``amount``. A miner listed twice gets the sum of its parts.

    Raises:
        ValueError: no weights, or a weight below 1.
    """
    if not weights or any(w < 1 for _, w in weights):
        raise ValueError("a split needs at least one payee, each with a weight of 1 or more")
    total = sum(w for _, w in weights)
    parts = [amount * w // total for _, w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-(amount * weights[i][1] % total), i))
    for i in order[:amount - sum(parts)]:
        parts[i] += 1
    out: dict[str, int] = {}
    for (miner_id, _), part in zip(weights, parts, strict=True):
        out[miner_id] = out.get(miner_id, 0) + part
    return list(out.items())
