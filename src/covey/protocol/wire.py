"""The wire's base types: frozen frames, typed ids, digests, base64 and receipts.

Every other module of :mod:`covey.protocol` builds on these; this one imports only pydantic
and the standard library.
"""

from __future__ import annotations

from typing import Annotated, NewType

from pydantic import BaseModel, ConfigDict, Field, model_validator

MinerId = NewType("MinerId", str)
"""Hex Ed25519 public key of a miner (64 hex characters)."""
JobId = NewType("JobId", str)
"""Coordinator-assigned job id, unique per coordinator."""

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Base64 = Annotated[str, Field(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=2**26)]
"""Standard base64 (RFC 4648 §4), the encoding of every ciphertext on the wire."""
TokenId = Annotated[int, Field(ge=0, lt=2**31)]


class _Frame(BaseModel):
    """Base of every frame: immutable, and an unknown field is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardRange(_Frame):
    """A contiguous range of a model's decoder blocks, ``[start, end)`` of ``total``.

    The shard holding block 0 also holds the token embeddings; the one ending at ``total``
    the final norm and the LM head (it samples). Petals and exo split models the same way.
    """

    start: int = Field(ge=0, lt=2**16)
    end: int = Field(ge=1, le=2**16)
    total: int = Field(ge=1, le=2**16)

    @model_validator(mode="after")
    def _ordered(self) -> ShardRange:
        if not self.start < self.end <= self.total:
            raise ValueError(f"blocks {self.start}:{self.end} are not a range within "
                             f"0:{self.total}")
        return self

    @property
    def first(self) -> bool:
        """Holds the embeddings (block 0)."""
        return self.start == 0

    @property
    def last(self) -> bool:
        """Holds the LM head (the model's last block)."""
        return self.end == self.total

    @property
    def size(self) -> int:
        """Blocks in the range."""
        return self.end - self.start

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class Receipt(_Frame):
    """A miner's account of one job (or, after a failover, of its part of one).

    ``request_sha256`` is :func:`~covey.protocol.receipts.request_digest` of the job;
    ``output_sha256`` the SHA-256 of the UTF-8 text this miner sent (of an embedding: of
    the ``vectors`` base64 text); token counts as in its ``done`` (or ``embedded``) frame,
    ``completion_tokens`` 0 for an embedding; ``miner`` is its public key (hex).
    """

    job_id: str = Field(max_length=100)
    miner: str = Field(pattern=r"^[0-9a-f]{64}$")
    model_sha256: Sha256Hex
    request_sha256: Sha256Hex
    output_sha256: Sha256Hex
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
