"""The scoring task: ``score`` → (``key_chunk``* from the coordinator) → ``scored`` | ``error``.

A scoring model is a small tabular model (an ONNX file) that turns one row of numbers, the
features its :class:`ScoringCard` lists in order, into one number: the probability its card
names. A task scores its rows one of three ways:

- **plain**: ``inputs`` in the clear; the answer's ``outputs`` are re-checked like other
  tasks (a validator recomputes them);
- **proved** (``proof``): the miner also returns, per row, a zero-knowledge proof (ezkl)
  that the committed model produced that output from that input; the coordinator verifies
  every proof before paying, and anyone can verify offline with the model's verifying key;
- **encrypted**: the row arrives as a CKKS ciphertext (TenSEAL) under the client's keys,
  and the answer is a ciphertext only the client can open: the model's logit, which the
  client turns into the probability with the exact sigmoid (:mod:`covey.scoring.he` says
  why no polynomial runs on ciphertext). The public evaluation keys (a few MB) are
  registered once and named by their SHA-256 (``keys_sha256``); when the miner does not hold
  them yet they follow the task in ``key_chunk`` frames (``keys_bytes`` set).

Usage: ``rows`` scored (the task's input unit) and ``work_ms``, the milliseconds spent
proving or computing on ciphertext (0 for plain rows), both billed.
"""

from __future__ import annotations

import hashlib
import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from covey.protocol.wire import Base64, JobId, Receipt, Sha256Hex, _Frame

MAX_ROWS = 1024
"""Rows per plain request."""
MAX_PROOF_ROWS = 4
"""Rows per proved request: each row is its own proof, seconds of work."""
MAX_FEATURES = 1024
"""Features per row."""
KEY_CHUNK_BYTES = 1024 * 1024
"""Largest payload of one ``key_chunk`` frame (bytes, before base64)."""
MAX_KEYS_BYTES = 16 * 1024 * 1024
"""Largest evaluation-key set a task may carry (the bundled scheme's keys are ~3.7 MB:
five rotation keys at N=8192, :mod:`covey.scoring.he`)."""

Feature = Annotated[str, Field(min_length=1, max_length=100)]


class ScoringCard(_Frame):
    """What a scoring model takes and gives (``GET /v1/models/{id}`` shows it).

    ``features``: the input columns in order; ``ranges``: per feature, the (low, high) a
    proof can take (ezkl's fixed-point lookups are calibrated on them; plain scoring takes
    any finite value); ``output``: what the one output number is; ``training_data`` and
    ``accuracy`` (share correct on held-out rows, ``test_rows`` of them) say how far to trust
    it; ``encrypted_error``: the largest difference an encrypted score may have from the
    plain one (CKKS noise and rounding; the client applies the sigmoid exactly), None when
    the model cannot score ciphertext.
    """

    features: tuple[Feature, ...] = Field(min_length=1, max_length=MAX_FEATURES)
    ranges: tuple[tuple[float, float], ...] = ()
    output: str = Field(max_length=500)
    training_data: str = Field(default="", max_length=2000)
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    test_rows: int = Field(default=0, ge=0)
    encrypted_error: float | None = Field(default=None, ge=0.0)


class Score(_Frame):
    """Task: score ``inputs`` (rows of the card's features) or the one ``encrypted`` row.

    Exactly one of ``inputs`` and ``encrypted`` is set. ``proof`` asks for a proof per row
    (plain inputs only, at most :data:`MAX_PROOF_ROWS`). ``encrypted`` is an encrypted row
    (base64 of :mod:`covey.scoring.he`'s envelope) under the evaluation keys
    ``keys_sha256``;
    ``keys_bytes`` is set when those keys follow in ``key_chunk`` frames (the coordinator
    has not sent them to this miner yet).
    """

    type: Literal["score"] = "score"
    job_id: JobId
    model: str
    model_sha256: Sha256Hex | None = None
    inputs: tuple[tuple[float, ...], ...] | None = Field(default=None, min_length=1,
                                                          max_length=MAX_ROWS)
    proof: bool = False
    encrypted: Base64 | None = None
    keys_sha256: Sha256Hex | None = None
    keys_bytes: int | None = Field(default=None, ge=1, le=MAX_KEYS_BYTES)

    @field_validator("inputs")
    @classmethod
    def _finite(cls, rows: tuple[tuple[float, ...], ...] | None
                ) -> tuple[tuple[float, ...], ...] | None:
        for row in rows or ():
            if not 1 <= len(row) <= MAX_FEATURES:
                raise ValueError(f"a row holds 1 to {MAX_FEATURES} features")
            if not all(math.isfinite(x) for x in row):
                raise ValueError("a feature is not a finite number")
        return rows

    @model_validator(mode="after")
    def _one_input(self) -> Score:
        if (self.inputs is None) == (self.encrypted is None):
            raise ValueError("exactly one of inputs and encrypted is set")
        if self.encrypted is not None and self.keys_sha256 is None:
            raise ValueError("an encrypted row needs its keys_sha256")
        if self.proof and self.encrypted is not None:
            raise ValueError("proofs are made for plain inputs only")
        if self.proof and self.inputs is not None and len(self.inputs) > MAX_PROOF_ROWS:
            raise ValueError(f"at most {MAX_PROOF_ROWS} rows are proved per request")
        return self

    @property
    def rows(self) -> int:
        """The task's billed rows."""
        return len(self.inputs) if self.inputs is not None else 1


class KeyChunk(_Frame):
    """Coordinator → miner: bytes ``seq`` (0, 1, …) of a ``score`` task's evaluation keys."""

    type: Literal["key_chunk"] = "key_chunk"
    job_id: JobId
    seq: int = Field(ge=0)
    data: Base64 = Field(max_length=(KEY_CHUNK_BYTES // 3 + 1) * 4)


class Scored(_Frame):
    """The answer to ``score``: ``outputs`` (one float per row, plain and proved), or
    ``encrypted`` (the encrypted logit in :mod:`covey.scoring.he`'s envelope, for the client
    to decrypt); ``proofs`` (ezkl proof JSON texts, one per row) when asked; ``rows`` and
    ``work_ms`` are the usage. ``receipt`` (``prompt_tokens`` holds ``rows``,
    ``completion_tokens`` ``work_ms``; ``output_sha256`` is :func:`scored_digest`) and
    ``signature`` are added by the miner's agent."""

    type: Literal["scored"] = "scored"
    job_id: JobId
    rows: int = Field(ge=0)
    work_ms: int = Field(default=0, ge=0)
    outputs: tuple[float, ...] | None = Field(default=None, max_length=MAX_ROWS)
    encrypted: Base64 | None = None
    proofs: tuple[Annotated[str, Field(max_length=2**20)], ...] = Field(
        default=(), max_length=MAX_PROOF_ROWS)
    receipt: Receipt | None = None
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")


def scored_digest(outputs: tuple[float, ...] | None, encrypted: str | None,
                  proofs: tuple[str, ...] = ()) -> str:
    """SHA-256 (hex) of an answer: the outputs' ``repr`` joined by commas (exact float
    text), or the ciphertext's base64 text, then each proof's SHA-256: a scoring receipt's
    ``output_sha256``."""
    digest = hashlib.sha256()
    if outputs is not None:
        digest.update(",".join(repr(float(x)) for x in outputs).encode())
    if encrypted is not None:
        digest.update(encrypted.encode())
    for proof in proofs:
        digest.update(hashlib.sha256(proof.encode()).digest())
    return digest.hexdigest()
