"""What running a task produced (:class:`Outcome`), and settling it (:func:`settle`).

Running a task with the failover policy ends in one frozen :class:`Outcome`: who served it,
the units delivered, the receipt, the fault if any. :func:`settle` is a pure function of an
outcome and a price that returns the one ledger operation closing the request's escrow
(DESIGN.md, "Run → Outcome → settle"); :class:`~covey.coordinator.billing.Billing` applies
it and the verifier reads the outcome. Neither looks at a live job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from covey.coordinator.ledger.bank import UsageRecord
from covey.coordinator.ledger.pricing import Price, cost
from covey.protocol import (
    Embed,
    Generate,
    JobId,
    MinerId,
    ModelOffer,
    Paint,
    Score,
    Speak,
    Transcribe,
)
from covey.protocol.receipts import Receipt
from covey.protocol.shard import Tensor

if TYPE_CHECKING:
    from covey.coordinator.miners import MinerSession

Ending = Literal["done", "failed", "client_closed"]
"""``done``: the miner finished; ``failed``: the miners failed or nothing started (nobody is
paid); ``client_closed``: the client left mid-answer (it pays for what it was sent)."""


@dataclass(frozen=True)
class TextAnswer:
    """A generation's answer as the finishing miner delivered it, for re-checks.

    ``sent`` is the job as that miner got it (a sealed job: its box), pinned to the
    weights; ``token_ids`` / ``text`` the whole answer (empty when sealed); ``sealed_stream``
    the miner's sealed deltas; ``key_for`` asks the client to seal the session key to a
    validator (sealed jobs only); ``delivered`` counts the token ids handed out. The
    sequences are the finished job's own (not copied: nothing appends to them any more).
    """

    sent: Generate
    token_ids: Sequence[int]
    text: str
    finish_reason: str
    delivered: int
    sealed_stream: Sequence[str] = ()
    key_for: Callable[[MinerSession], Awaitable[str | None]] | None = None


@dataclass(frozen=True)
class EmbedAnswer:
    """An embedding task as the finishing miner got it (pinned to its weights) and the
    vectors it returned (base64, :func:`~covey.protocol.embed.pack_vectors`)."""

    sent: Embed
    vectors: str
    dimensions: int


@dataclass(frozen=True)
class TranscriptAnswer:
    """A transcription as the finishing miner got it (``sent``: pinned to its weights,
    from its ``offset``), the ``audio`` it transcribed (the whole upload) and the text of
    the segments it sent."""

    sent: Transcribe
    audio: bytes
    text: str


@dataclass(frozen=True)
class SpeechAnswer:
    """A speech task as the miner got it and the audio file it returned (``duration`` in
    seconds and ``sample_rate`` in Hz, as it reported)."""

    sent: Speak
    audio: bytes
    duration: float
    sample_rate: int


@dataclass(frozen=True)
class ImageAnswer:
    """An image task as the miner got it and the PNG images it returned (base64)."""

    sent: Paint
    images: tuple[str, ...]


@dataclass(frozen=True)
class ScoreAnswer:
    """A scoring task as the miner got it (pinned to its weights) and what it returned:
    ``outputs`` for plain rows, ``encrypted`` (base64) for an encrypted one, ``proofs``
    when asked (already verified before the answer was accepted)."""

    sent: Score
    outputs: tuple[float, ...] | None
    encrypted: str | None
    proofs: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardLink:
    """One link of a chain as it ran: ``miner_id`` ran blocks ``[start, end)`` and got
    ``tokens`` (the first link: the prompt's job's token ids after the prompt) or the
    hidden-state ``chunks`` (tensor, bytes) the link before it sent."""

    miner_id: MinerId
    start: int
    end: int
    tokens: tuple[int, ...]
    chunks: tuple[tuple[Tensor, bytes], ...]


@dataclass(frozen=True)
class ShardAnswer:
    """A sharded model's answer, for re-checking one link: ``job`` as asked, the
    weights, the model's ``total`` blocks and the chain's ``links`` in order (a link's
    output is the next link's ``chunks``; the last link's, the ``sampled`` tokens)."""

    job: Generate
    sha256: str
    total: int
    links: tuple[ShardLink, ...]
    sampled: tuple[int, ...] = ()
    """Every token the last shard sampled, an ending end-of-text token included (one per
    position from the prompt's last)."""


Answer = (TextAnswer | EmbedAnswer | TranscriptAnswer | SpeechAnswer | ImageAnswer | ScoreAnswer
          | ShardAnswer)
"""What a validator re-checks, one class per task kind."""


@dataclass(frozen=True)
class Share:
    """One shard miner's part of a sharded model's answer: ``blocks`` it ran."""

    miner_id: MinerId
    blocks: int


@dataclass(frozen=True)
class Outcome:
    """One request's end (see the module docstring).

    ``miner_id`` / ``offer``: the miner that served it last (None when none started it);
    ``prompt_tokens`` / ``completion_tokens``: the billable units (tokens, for text and
    embeddings; for media ``prompt_tokens`` holds seconds of audio, characters or image
    tiles); ``receipt``: the finishing miner's receipt and signature when it checked
    out; ``fault``: why that miner's usage report is false (nobody is paid, the verifier
    punishes); ``checkable``: the client allows a re-check; ``answer``: what a validator
    re-checks (None when nothing finished); ``shares``: a sharded model's chain, each
    shard paid its share of the blocks (empty: ``miner_id`` is paid), and
    ``shard_receipts`` its shards' checked receipts (one per chain session).
    """

    job_id: JobId
    account: str
    model: str
    ending: Ending
    miner_id: MinerId | None = None
    offer: ModelOffer | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    receipt: tuple[Receipt, str] | None = None
    fault: str | None = None
    failovers: int = 0
    checkable: bool = True
    answer: Answer | None = None
    shares: tuple[Share, ...] = ()
    shard_receipts: tuple[tuple[Receipt, str], ...] = ()


@dataclass(frozen=True)
class Charge:
    """Close the escrow of ``job_id``: the miner earns ``amount`` µcr (less the protocol
    fee), the rest goes back to ``account``; ``usage`` and ``receipt`` are stored with it.
    ``shares`` (miner id, blocks) splits the miners' part among a chain of shards, whose
    receipts are ``shard_receipts``."""

    job_id: JobId
    account: str
    miner_id: MinerId
    amount: int
    usage: UsageRecord
    receipt: tuple[Receipt, str] | None = None
    shares: tuple[tuple[str, int], ...] = ()
    shard_receipts: tuple[tuple[Receipt, str], ...] = ()


@dataclass(frozen=True)
class Refund:
    """Return the whole escrow of ``job_id`` to ``account``."""

    job_id: JobId
    account: str


LedgerOp = Charge | Refund


def settle(outcome: Outcome, price: Price) -> LedgerOp:
    """The ledger operation that closes ``outcome``'s escrow at ``price`` (µcr per 1M
    tokens).

    Nobody is paid when no miner served the request, when the miners failed, or when the
    finishing miner's usage report was false (a failed check, DESIGN.md, Trust). Otherwise
    the miner that finished earns the cost of the units delivered; after a failover the
    user still pays once, to that miner, which evaluated the whole prompt itself. A
    sharded model's answer pays the chain that finished it, each shard for its share of
    the blocks (a shard replaced mid-answer is paid nothing, like a failed-over miner).
    """
    if outcome.miner_id is None or outcome.ending == "failed" or outcome.fault is not None:
        return Refund(outcome.job_id, outcome.account)
    return Charge(outcome.job_id, outcome.account, outcome.miner_id,
                  cost(price, outcome.prompt_tokens, outcome.completion_tokens),
                  UsageRecord(outcome.model, outcome.prompt_tokens, outcome.completion_tokens),
                  outcome.receipt, tuple((s.miner_id, s.blocks) for s in outcome.shares),
                  outcome.shard_receipts)
