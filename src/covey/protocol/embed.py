"""The embedding task: ``embed`` → ``embedded`` | ``error``.

Vectors travel as base64 of little-endian float32, row-major (``len(inputs)`` rows of
``dimensions``), so a batch of 64 × 384 floats is 131 KB of base64, not a megabyte of JSON
numbers; :func:`pack_vectors` and :func:`unpack_vectors` convert.
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from array import array
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from covey.protocol.wire import Base64, JobId, Receipt, Sha256Hex, TokenId, _Frame

MAX_INPUTS = 2048
"""Inputs per request, as on OpenAI's embeddings endpoint."""


class Embed(_Frame):
    """Task: embed each input; usage in input tokens (``prompt_tokens``).

    Exactly one of ``input`` (texts) or ``input_ids`` (token ids per input, under the
    model's own tokenizer) is set. An input longer than the model's limit is refused with
    ``context_length_exceeded`` unless ``truncate`` is set.
    """

    type: Literal["embed"] = "embed"
    job_id: JobId
    model: str
    model_sha256: Sha256Hex | None = None
    input: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=MAX_INPUTS)
    input_ids: tuple[tuple[TokenId, ...], ...] | None = Field(
        default=None, min_length=1, max_length=MAX_INPUTS)
    truncate: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> Embed:
        if (self.input is None) == (self.input_ids is None):
            raise ValueError("exactly one of input and input_ids is set")
        return self

    @property
    def count(self) -> int:
        """How many inputs (hence vectors) the task has."""
        return len(self.input if self.input is not None else self.input_ids or ())


class Embedded(_Frame):
    """The answer to ``embed``: ``vectors`` (:func:`pack_vectors`) of ``dimensions`` floats
    per input, in input order, and ``prompt_tokens``, the input tokens over all inputs (what
    the request is billed for).

    ``receipt`` (its ``output_sha256`` is :func:`vectors_digest` of ``vectors``) and
    ``signature`` are added by the miner's agent, as for ``done``.
    """

    type: Literal["embedded"] = "embedded"
    job_id: JobId
    dimensions: int = Field(ge=1, le=2**16)
    vectors: Base64
    prompt_tokens: int = Field(ge=0)
    receipt: Receipt | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


def pack_vectors(rows: Sequence[Sequence[float]]) -> str:
    """Base64 of ``rows`` as little-endian float32, row-major.

    Raises:
        ValueError: rows of unequal length, or a value that is not finite.
    """
    width = len(rows[0]) if rows else 0
    flat = array("f")
    for row in rows:
        if len(row) != width:
            raise ValueError("rows of unequal length")
        flat.extend(row)
    if not all(math.isfinite(x) for x in flat):
        raise ValueError("a vector holds a value that is not finite")
    if sys.byteorder == "big":
        flat.byteswap()
    return base64.b64encode(flat.tobytes()).decode()


def unpack_vectors(vectors: str, dimensions: int) -> list[list[float]]:
    """The rows :func:`pack_vectors` packed (float32 values widened to Python floats).

    Raises:
        ValueError: not base64, or a length that is not a whole number of rows.
    """
    raw = base64.b64decode(vectors, validate=True)
    if len(raw) % (4 * dimensions):
        raise ValueError(f"{len(raw)} bytes are not whole rows of {dimensions} float32")
    flat = array("f")
    flat.frombytes(raw)
    if sys.byteorder == "big":
        flat.byteswap()
    return [flat[i:i + dimensions].tolist() for i in range(0, len(flat), dimensions)]


def count_vectors(vectors: str, dimensions: int) -> int:
    """How many rows of ``dimensions`` float32 ``vectors`` holds, without unpacking them.

    Raises:
        ValueError: not base64, or a length that is not a whole number of rows.
    """
    size = len(base64.b64decode(vectors, validate=True))
    if size % (4 * dimensions):
        raise ValueError(f"{size} bytes are not whole rows of {dimensions} float32")
    return size // (4 * dimensions)


def vectors_digest(vectors: str) -> str:
    """SHA-256 (hex) of the base64 text of ``vectors``: an embedding receipt's
    ``output_sha256``."""
    return hashlib.sha256(vectors.encode()).hexdigest()


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors of equal length (0.0 when either is all zeros)."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0
