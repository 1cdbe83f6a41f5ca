"""``POST /v1/embeddings``: OpenAI's request and response bodies.

``input`` is a string, a list of strings, a list of token ids, or a list of lists of token
ids (ids of the serving model's own tokenizer). ``encoding_format`` ``base64`` gives each
embedding as base64 of little-endian float32, as OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

from covey.protocol.embed import MAX_INPUTS
from covey.protocol.openai import _Request

_TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=1)]


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings`` body; ``truncate`` (Covey's own) cuts inputs longer than the
    model reads instead of refusing them with ``context_length_exceeded``."""

    model: str = Field(min_length=1)
    input: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]
            | _TokenIds
            | Annotated[list[_TokenIds], Field(min_length=1, max_length=MAX_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    truncate: bool = False

    @field_validator("input", mode="before")
    @classmethod
    def _shape(cls, v: object) -> object:
        """Say plainly what is wrong with ``input`` (the union's own errors say "Input
        should be a valid string" for any of it)."""
        if isinstance(v, str):
            if not v:
                raise ValueError("an input string is empty; every input needs text")
            return v
        if not isinstance(v, list):
            raise ValueError("expected a string, a list of strings, a list of token ids or a "
                             "list of lists of token ids")
        if not v:
            raise ValueError("the list is empty; send at least one input")
        if all(isinstance(x, str) for x in v):
            if len(v) > MAX_INPUTS:
                raise ValueError(f"{len(v)} inputs; at most {MAX_INPUTS} per request")
            if "" in v:
                raise ValueError("an input string is empty; every input needs text")
            return v
        rows = v if all(isinstance(x, list) for x in v) else [v]
        if len(rows) > MAX_INPUTS:
            raise ValueError(f"{len(rows)} inputs; at most {MAX_INPUTS} per request")
        for row in rows:
            if not row:
                raise ValueError("a token-id list is empty; every input needs a token")
            if not all(type(t) is int and 0 <= t < 2**31 for t in row):
                raise ValueError("token ids are integers from 0 to 2^31 − 1, and a list "
                                 "holds strings only or token ids only")
        return v

    def texts(self) -> tuple[str, ...] | None:
        """The inputs as texts, or None when they are token ids."""
        if isinstance(self.input, str):
            return (self.input,)
        if isinstance(self.input[0], str):
            return tuple(self.input)  # type: ignore[arg-type]
        return None

    def token_ids(self) -> tuple[tuple[int, ...], ...] | None:
        """The inputs as token-id lists, or None when they are texts."""
        if isinstance(self.input, str) or isinstance(self.input[0], str):
            return None
        if isinstance(self.input[0], int):
            return (tuple(self.input),)  # type: ignore[arg-type]
        return tuple(tuple(row) for row in self.input)  # type: ignore[union-attr]


class Embedding(BaseModel):
    """One input's vector: floats, or base64 of little-endian float32."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """Input tokens, by the serving model's tokenizer (special tokens included)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    """``POST /v1/embeddings`` answer; ``id`` (Covey's own) names the request for its
    receipt (``GET /v1/receipts/{id}``)."""

    id: str
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
