"""The OpenAI-compatible HTTP API: request and response bodies.

Field names and shapes follow OpenAI's Chat Completions and Completions references. Unknown
request fields are ignored (clients send many optional ones); fields we cannot honour are
refused with a clear error by the coordinator rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)

from covey.protocol.score import ScoringCard


class _Request(BaseModel):
    # Strict: "stream": "yes" or "max_tokens": "3" are errors, as on OpenAI's API.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    """One part of a multi-part message; only ``text`` parts are supported."""

    type: Literal["text"]
    text: str


class Message(_Request):
    """A chat message. ``content`` is a string or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text, parts joined with no separator."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    """``include_usage``: send a final chunk with ``usage`` and empty ``choices``."""

    include_usage: bool = False


class _Sampling(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Covey's own fields (the openai SDK sends them with ``extra_body``).
    watermark: bool = False
    """Watermark the answer with the network's key (POST /v1/watermark/detect finds it)."""
    check: bool = True
    """False: this request is never sampled for a re-check by a validator (for sealed
    requests, the validator is the only other party that would see the plaintext)."""

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if v == "" or (isinstance(v, list) and "" in v):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        """``stop`` as a tuple of strings."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions`` body."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` body. ``prompt`` is a string or a list of one string."""

    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)


class Usage(BaseModel):
    """Token counts of one request, by the serving model's tokenizer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    """Non-streaming chat response."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """A chunk's delta; unset fields are left out (``{}`` on the final chunk), as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streaming chat response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class Completion(BaseModel):
    """Non-streaming completion response; streaming chunks have the same shape."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelPrice(BaseModel):
    """µcr per ``per`` units of ``unit``: ``prompt`` for input (prompt tokens, seconds of
    audio, characters, 256-pixel image tiles), ``completion`` for generated tokens."""

    prompt: int
    completion: int
    unit: str = "tokens"
    per: int = 1_000_000


class ShardHolder(BaseModel):
    """A live miner holding blocks ``[start, end)`` of a sharded model."""

    miner: str
    start: int
    end: int


class ModelShards(BaseModel):
    """How a sharded model is held: its ``total`` blocks, the live shards, and the
    ``missing`` block ranges ``[start, end)`` no live miner holds (empty: complete)."""

    total: int
    held: list[ShardHolder]
    missing: list[tuple[int, int]]


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``; ``miners`` is how many live miners serve it (a
    sharded model: how many hold a shard of it)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "covey"
    miners: int
    context_length: int | None = None
    kind: str = "chat"
    """What the model does: ``chat`` (chat and completions), ``embedding``,
    ``transcription``, ``speech``, ``image`` or ``scoring``."""
    dimensions: int | None = None
    """An embedding model's vector length (None for other kinds)."""
    voices: list[str] | None = None
    """A speech model's voices (None for other kinds)."""
    sizes: list[str] | None = None
    """An image model's sizes, ``WIDTHxHEIGHT``, the default first (None for other
    kinds)."""
    status: Literal["up", "trial", "offline", "incomplete"] = "up"
    """``up``: live miners serve it; ``trial``: miners offer it but are still on their
    trial; ``offline``: no live miner offers it; ``incomplete``: a sharded model some of
    whose blocks no live miner holds (``shards.missing``)."""
    miners_on_trial: int = 0
    """Live miners that offer the model and await their trial."""
    price: ModelPrice | None = None
    """What a request costs (the network's floor, or the dearest live miner's ask)."""
    ttft_s: float | None = None
    """Measured time to first token over recent answers, seconds (None before any)."""
    decode_tps: float | None = None
    """Measured decode rate over recent answers, tokens per second (None before any)."""
    card: ScoringCard | None = None
    """A scoring model's card: its features in the order ``inputs`` rows list them, its
    output, training data and accuracy (None for other kinds)."""
    proof: bool = False
    """A scoring model whose answers can be proved (``"proof": true``): this coordinator
    holds its verifying key and a live miner its proving key."""
    proof_vk_sha256: str | None = None
    """SHA-256 of the verifying key proofs are checked with (compare with the model
    owner's before trusting ``covey proofs verify``)."""
    encrypted: bool = False
    """A scoring model that scores encrypted rows (``"encrypted"``)."""
    shards: ModelShards | None = None
    """A sharded model, served by a chain of miners each holding a block range (None for
    a model miners serve whole)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorBody


class WatermarkDetectRequest(_Request):
    """``POST /v1/watermark/detect`` body (Covey's own endpoint): score ``text`` for the
    network's watermark, tokenized by ``model``'s tokenizer."""

    model: str = Field(min_length=1)
    text: str = Field(max_length=2**20)


class WatermarkDetection(BaseModel):
    """``POST /v1/watermark/detect`` answer: ``tokens_scored`` (distinct pairs of a token and
    the one before it), ``green_tokens`` (of those, how many are green), ``z_score``,
    one-sided ``p_value``, ``watermarked`` (z above ``threshold``) and ``gamma`` (the green
    share); see :mod:`covey.protocol.watermark`."""

    object: Literal["watermark.detection"] = "watermark.detection"
    model: str
    tokens_scored: int
    green_tokens: int
    z_score: float
    p_value: float
    watermarked: bool
    threshold: float
    gamma: float
