"""The client ⇄ coordinator channel for sealed (end-to-end encrypted) requests.

One WebSocket, ``/v1/sealed``, authenticated by the API key, carries any number of requests
at once, each named by the client's ``id``. A request runs:

1. client ``request`` (model, sampling settings, a bound on the prompt's size); the
   coordinator holds the escrow and reserves a miner;
2. coordinator ``route``: the miner's identity and its box key signed by it; the client
   checks the signature (:func:`covey.protocol.sealing.verify_route`);
3. client ``job``: the content sealed to that key;
4. coordinator ``started``, ``delta``* (sealed), then ``done`` (usage, from the miner's
   signed receipt) or ``error``. If the miner fails mid-answer the coordinator sends another
   ``route`` and the client seals again, with the resume point, to the next miner.

After ``done``, a request the client allowed to be checked may get a ``check_route``: the
client answers ``check_key`` with the session key sealed to that validator (or none, to
decline). ``cancel`` from the client stops a request.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from covey.protocol.frames import Base64, SamplingParams
from covey.protocol.openai import ErrorBody

SUBPROTOCOL = "covey-sealed.v1"
"""The WebSocket subprotocol a browser asks for on ``/v1/sealed``."""
KEY_SUBPROTOCOL = "bearer."
"""Prefix of the second subprotocol a browser offers: ``bearer.<API key>`` (API keys are
URL-safe base64, valid in a subprotocol token). Browsers cannot set ``Authorization`` on a
WebSocket, and a key in the URL would reach access logs."""

RequestId = Annotated[str, Field(min_length=1, max_length=64)]
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Hex128 = Annotated[str, Field(pattern=r"^[0-9a-f]{128}$")]


class _Msg(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RouteRequest(_Msg):
    """Start a sealed request. ``size`` bounds the prompt in tokens: the byte length of the
    content the client will seal (:class:`~covey.protocol.sealing.SealedContent` as JSON)
    bounds it, since no tokenizer spends more than a token per byte. ``chat`` picks the
    response id's prefix; ``check`` False keeps the answer from being re-checked;
    ``token_ids`` says the prompt inside is token ids (a private model's: a private model
    refuses text before any miner sees it)."""

    type: Literal["request"] = "request"
    id: RequestId
    model: str = Field(min_length=1, max_length=200)
    params: SamplingParams
    size: int = Field(ge=1, le=2**26)
    chat: bool = True
    check: bool = True
    token_ids: bool = False
    """The sealed prompt is token ids (a private model's), not text."""


class Route(_Msg):
    """Seal the job (``job_id``) to ``miner``'s ``box_key``, signed by it."""

    type: Literal["route"] = "route"
    id: RequestId
    job_id: str
    miner: Hex64
    box_key: Hex64
    box_signature: Hex128


class SealedJob(_Msg):
    """The job's content sealed to the last route (:func:`~covey.protocol.sealing.seal_job`)."""

    type: Literal["job"] = "job"
    id: RequestId
    sealed: Base64


class RouteStarted(_Msg):
    """The miner started: ``prompt_tokens`` is the prompt's length."""

    type: Literal["started"] = "started"
    id: RequestId
    prompt_tokens: int = Field(ge=0)


class SealedDelta(_Msg):
    """Sealed text and token ids (``tokens`` of them) from the miner."""

    type: Literal["delta"] = "delta"
    id: RequestId
    sealed: Base64
    tokens: int = Field(ge=0)


class RouteDone(_Msg):
    """The answer ended; usage in tokens for the whole answer (what the client pays)."""

    type: Literal["done"] = "done"
    id: RequestId
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class RouteError(_Msg):
    """The request failed; ``error`` is OpenAI's error body and ``status`` its HTTP status."""

    type: Literal["error"] = "error"
    id: RequestId
    status: int = Field(ge=400, le=599)
    error: ErrorBody


class CheckRoute(_Msg):
    """The answer was picked for a re-check by validator ``miner``: seal the session key to
    its ``box_key`` (signed by it)."""

    type: Literal["check_route"] = "check_route"
    id: RequestId
    miner: Hex64
    box_key: Hex64
    box_signature: Hex128


class CheckKey(_Msg):
    """The session key sealed to the validator of the last ``check_route`` (None: declined)."""

    type: Literal["check_key"] = "check_key"
    id: RequestId
    sealed_key: Base64 | None = None


class CancelRequest(_Msg):
    """Stop the request (the user went away, or a private model's stop string was seen)."""

    type: Literal["cancel"] = "cancel"
    id: RequestId


ClientMessage = Annotated[RouteRequest | SealedJob | CheckKey | CancelRequest,
                          Field(discriminator="type")]
ServerMessage = Annotated[Route | RouteStarted | SealedDelta | RouteDone | RouteError
                          | CheckRoute, Field(discriminator="type")]

CLIENT_MESSAGE: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
"""Parses a client message (``validate_json``); raises ``pydantic.ValidationError``."""
SERVER_MESSAGE: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)
"""Parses a coordinator message (``validate_json``); raises ``pydantic.ValidationError``."""
