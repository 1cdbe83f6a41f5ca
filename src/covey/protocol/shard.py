"""Sharded models: one step of a chain session on one shard, and the binary frames that
carry activations.

A sharded model is served by a chain of miners, each holding a block range
(:class:`~covey.protocol.wire.ShardRange`). Miners sit behind NAT, so the coordinator
relays: it sends a :class:`Forward` to the first shard, hands the hidden states it gets
back (:class:`Forwarded`) to the next shard, and so on; the last shard samples the next
token with the request's settings and seed and returns it with the text it completes.
One generation is one *session* per shard (its KV cache); its first step is the prompt
(prefill), each later one a token (decode).

Both frames travel as WebSocket **binary** messages, never as JSON text, so tensors are
raw bytes (:func:`encode_binary`)::

    b"CVY1" | u32 little-endian header length | header (the frame as JSON) | tensor bytes

The header's ``hidden`` gives the tensor's shape and dtype; the bytes are row-major,
little-endian. A float16 hidden state of SmolLM2's 576 dimensions is 1,152 bytes a token.

What a shard sees: the first and the last see token ids (the first tokenizes the prompt,
the last decodes the answer); a middle one sees only hidden states, which published
attacks can invert back to the prompt (arXiv 2505.18332). Sharding is not a privacy
feature.
"""

from __future__ import annotations

import array
import hashlib
import json
import struct
import sys
from typing import Literal

from pydantic import Field, model_validator

from covey.protocol.frames import ChatMessage, SamplingParams
from covey.protocol.wire import JobId, Receipt, Sha256Hex, ShardRange, TokenId, _Frame

__all__ = ["DType", "Forward", "Forwarded", "Tensor", "decode_binary", "encode_binary",
           "tensor_digest", "tensor_values"]

MAGIC = b"CVY1"
"""First bytes of every binary frame (format version 1)."""
MAX_HEADER_BYTES = 2**20
"""Largest JSON header a binary frame may have (a first step's messages travel in it)."""
MAX_TENSOR_BYTES = 2**26
"""Largest tensor one frame carries (64 MiB, the WebSocket's frame cap)."""

DType = Literal["float16", "bfloat16", "float32"]
"""Activation dtypes on the wire: float16 and bfloat16 halve the bytes of float32."""
ITEM_SIZE: dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}


class Tensor(_Frame):
    """A tensor's shape and dtype (its bytes follow the header): hidden states are
    ``(batch, tokens, hidden size)``."""

    shape: tuple[int, ...] = Field(min_length=1, max_length=4)
    dtype: DType

    @model_validator(mode="after")
    def _bounded(self) -> Tensor:
        if any(n < 0 or n > 2**24 for n in self.shape) or self.nbytes > MAX_TENSOR_BYTES:
            raise ValueError(f"tensor of shape {self.shape} is out of bounds")
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        n = ITEM_SIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


class Forward(_Frame):
    """Task: run one step of chain session ``session`` through this shard's ``blocks``.

    ``position`` is how many tokens the shard's cache for the session holds before this
    step; 0 starts the session afresh (a new generation, or a replacement shard being
    rebuilt from the inputs its predecessor got). Inputs, by where the shard sits:

    - the first shard gets text (``messages`` or ``prompt``, tokenized and templated by
      the shard) on the first step, and ``token_ids`` on later ones; a rebuild sends both,
      the prompt then the tokens generated since;
    - any other shard gets ``hidden`` (the previous shard's output, bytes in ``data``).

    The shard answers with the hidden states of positions ``emit_from`` onwards (None: of
    this step's positions). The last shard instead samples one token from the last
    position with ``params`` (the seed makes step ``position`` reproducible on any miner)
    and decodes it: ``resume`` is the answer so far when it starts a session mid-answer,
    ``stop_ids`` end the answer like its own end-of-generation tokens, and ``final``
    asks it to flush text held back (the answer reached ``max_tokens``).
    """

    type: Literal["forward"] = "forward"
    job_id: JobId
    session: JobId
    model: str = Field(min_length=1, max_length=200)
    model_sha256: Sha256Hex | None = None
    blocks: ShardRange
    position: int = Field(ge=0, lt=2**24)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    token_ids: tuple[TokenId, ...] = Field(default=(), max_length=2**24)
    hidden: Tensor | None = None
    emit_from: int | None = Field(default=None, ge=0)
    params: SamplingParams = SamplingParams()
    stop_ids: tuple[TokenId, ...] = Field(default=(), max_length=64)
    resume: tuple[TokenId, ...] = Field(default=(), max_length=2**24)
    resume_chars: int = Field(default=0, ge=0)
    final: bool = False
    score_ids: tuple[TokenId, ...] = Field(default=(), max_length=2**24)
    """A validator's re-check of a last shard: instead of sampling, report how each of
    these tokens fits the logits at the step's last ``len(score_ids)`` positions
    (:attr:`Forwarded.gaps`)."""
    sample: bool = True
    """The last shard samples a token (False while a replacement is rebuilt from earlier
    steps: it answers with an empty tensor)."""
    data: bytes = Field(default=b"", exclude=True, repr=False)
    """The hidden states' bytes (never in the JSON header)."""

    @model_validator(mode="after")
    def _inputs(self) -> Forward:
        text = self.messages is not None or self.prompt is not None
        if self.messages is not None and self.prompt is not None:
            raise ValueError("a step carries messages or a prompt, not both")
        if self.hidden is not None and (text or self.token_ids):
            raise ValueError("a step carries hidden states or tokens, not both")
        if self.hidden is None and not text and not self.token_ids:
            raise ValueError("a step carries no input")
        if text and self.position != 0:
            raise ValueError("a prompt starts a session (position 0)")
        _check_data(self.hidden, self.data)
        return self


class Forwarded(_Frame):
    """A shard's answer to one :class:`Forward`.

    ``tokens`` is the positions the step added to the cache (the first step of a first
    shard: the prompt's length in tokens, after its chat template). ``hidden`` (bytes in
    ``data``) is the output for the next shard; the last shard sends ``token_id`` (the
    sampled token), ``text`` (what it completes, stop strings and split characters held
    back) and ``finish_reason`` ``stop`` when the answer ended on it (a last shard told not
to sample answers with an empty tensor). ``input_sha256`` and
    ``output_sha256`` are the SHA-256 of the step's input and output
    (:func:`tensor_digest`), what a shard's receipt covers.
    """

    type: Literal["forwarded"] = "forwarded"
    job_id: JobId
    tokens: int = Field(ge=0)
    hidden: Tensor | None = None
    token_id: TokenId | None = None
    text: str = ""
    finish_reason: Literal["stop"] | None = None
    gaps: tuple[float, ...] = Field(default=(), max_length=2**24)
    """Answering ``score_ids``: per token, the top logit minus the token's (0 where it is
    the argmax), in raw logits; the tensor is then empty."""
    compute_ms: float = Field(default=0.0, ge=0.0, le=1e9)
    """Milliseconds the shard spent on the step itself (the coordinator's relay cost per
    hop is the round trip less this)."""
    end_of_text: bool = False
    """The sampled token ended the answer (an end-of-generation or stop id): it is not
    part of the answer."""
    input_sha256: Sha256Hex
    output_sha256: Sha256Hex
    receipt: Receipt | None = None
    """The shard's account of the session so far (:func:`session_receipt`); the agent
    adds it and ``signature``, its hex Ed25519 signature."""
    signature: str | None = Field(default=None, pattern=r"^[0-9a-f]{128}$")
    data: bytes = Field(default=b"", exclude=True, repr=False)
    """The hidden states' bytes (never in the JSON header)."""

    @model_validator(mode="after")
    def _output(self) -> Forwarded:
        if (self.hidden is None) == (self.token_id is None):
            raise ValueError("a step's answer is hidden states or a token, one of them")
        _check_data(self.hidden, self.data)
        return self


def _check_data(hidden: Tensor | None, data: bytes) -> None:
    want = hidden.nbytes if hidden is not None else 0
    if len(data) != want:
        raise ValueError(f"{len(data)} bytes of tensor data for a tensor of {want}")


def tensor_digest(frame: Forward | Forwarded) -> str:
    """SHA-256 (hex) of what a step carries: its header's tensor fields or token ids and
    text, then the tensor's bytes. Both sides compute it the same way, so a receipt over
    it binds the exact activations."""
    h = hashlib.sha256()
    if isinstance(frame, Forward):
        head = frame.model_dump(mode="json", include={"messages", "prompt", "token_ids",
                                                      "hidden", "position"})
    else:
        head = frame.model_dump(mode="json", include={"hidden", "token_id", "text",
                                                      "finish_reason"})
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode())
    h.update(frame.data)
    return h.hexdigest()


def encode_binary(frame: Forward | Forwarded) -> bytes:
    """The frame as one binary WebSocket message (see the module docstring)."""
    header = frame.model_dump_json().encode()
    return MAGIC + struct.pack("<I", len(header)) + header + frame.data


def decode_binary(message: bytes) -> Forward | Forwarded:
    """Parse one binary message.

    Raises:
        ValueError: not a Covey binary frame, a header out of bounds, or tensor bytes
            that do not match the header (pydantic's ValidationError is a ValueError).
    """
    if len(message) < 8 or message[:4] != MAGIC:
        raise ValueError("not a Covey binary frame")
    (size,) = struct.unpack_from("<I", message, 4)
    if size > MAX_HEADER_BYTES or 8 + size > len(message):
        raise ValueError("binary frame header out of bounds")
    header = json.loads(message[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("binary frame header is not an object")
    header["data"] = bytes(message[8 + size:])
    kind = header.get("type")
    if kind == "forward":
        return Forward.model_validate(header)
    if kind == "forwarded":
        return Forwarded.model_validate(header)
    raise ValueError(f"unknown binary frame type {kind!r}")


def tensor_values(tensor: Tensor, data: bytes) -> array.array[float]:
    """The tensor's values as float32 (row-major), with the standard library only, so a
    coordinator needs no numpy to compare activations.

    Raises:
        ValueError: ``data`` does not hold ``tensor.nbytes`` bytes.
    """
    if len(data) != tensor.nbytes:
        raise ValueError(f"{len(data)} bytes for a tensor of {tensor.nbytes}")
    out = array.array("f")
    if tensor.dtype == "float32":
        out.frombytes(data)
        if sys.byteorder == "big":
            out.byteswap()
    elif tensor.dtype == "float16":
        out.extend(struct.unpack(f"<{len(data) // 2}e", data))
    else:  # bfloat16: the high half of a float32
        halves = array.array("H", data)
        if sys.byteorder == "big":
            halves.byteswap()
        bits = array.array("I", (h << 16 for h in halves))
        out.frombytes(bits.tobytes())
    return out


CHAIN_START = hashlib.sha256(b"covey-shard-receipt-v1").hexdigest()
"""Where a session's digest chains start (:func:`chain_digest`)."""


def chain_digest(previous: str, step: str) -> str:
    """SHA-256 (hex) of ``previous`` then ``step`` (both hex digests, as bytes): a session's
    inputs, or outputs, folded one step at a time from :data:`CHAIN_START`. One digest then
    binds every activation a shard received, or sent, in order."""
    return hashlib.sha256(bytes.fromhex(previous) + bytes.fromhex(step)).hexdigest()


def session_receipt(session: str, miner: str, model_sha256: str, inputs: str, outputs: str,
                    positions: int, steps: int) -> Receipt:
    """A shard's receipt for chain session ``session`` so far: ``request_sha256`` is the
    chain of its inputs' digests, ``output_sha256`` of its outputs' (:func:`chain_digest`),
    ``prompt_tokens`` the positions it ran, ``completion_tokens`` its steps."""
    return Receipt(job_id=session, miner=miner, model_sha256=model_sha256,
                   request_sha256=inputs, output_sha256=outputs, prompt_tokens=positions,
                   completion_tokens=steps)
