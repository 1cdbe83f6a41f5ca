"""The client's end of ``/v1/sealed``: end-to-end encrypted requests over one WebSocket.

:class:`SealedChannel` seals each request to the miner the coordinator routes it to, after
checking the route's signature, opens the sealed answer, re-seals to the next miner (with
the resume point) when the coordinator moves the request, and answers re-check requests by
sealing the session key to the validator. The coordinator sees the model, the sampling
settings, sizes and timings, never the prompt, the stop strings or the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import websockets
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from covey.protocol.e2e import (
    SERVER_MESSAGE,
    CancelRequest,
    CheckKey,
    CheckRoute,
    Route,
    RouteDone,
    RouteError,
    RouteRequest,
    RouteStarted,
    SealedDelta,
    SealedJob,
    _Msg,
)
from covey.protocol.errors import ApiError
from covey.protocol.frames import Generate, Resume
from covey.protocol.requests import MAX_BODY_BYTES, too_large
from covey.protocol.sealing import (
    SealedContent,
    SealingError,
    open_delta,
    seal_job,
    seal_key,
    verify_route,
)

log = logging.getLogger("covey.client.sealed")

IDLE_TIMEOUT = 600.0
"""Seconds a request may hear nothing from the coordinator before it fails (504): longer
than any queue wait or stall the coordinator itself allows."""
KEY_TTL = 300.0
"""Seconds a finished request's session key is kept to answer a re-check's key request
(the coordinator asks within a minute; then the key is dropped)."""


class TokenCodec(Protocol):
    """A private model's client side (:class:`covey.client.private.PrivateModel`): the real
    tokenizer and the secret permutation."""

    stop_ids: list[int]

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]: ...
    def prompt_ids(self, text: str) -> list[int]: ...
    def decoder(self, stop: tuple[str, ...] = ()) -> PrivateDecoder: ...


class PrivateDecoder(Protocol):
    """Turns a private model's permuted ids back into text (see :class:`TokenCodec`)."""

    stopped: bool

    def feed(self, ids: list[int]) -> str: ...
    def finish(self) -> str: ...


@dataclass
class Answer:
    """A sealed request as it runs: ``job_id`` (the response id), ``miner`` (the one now
    serving it), the tokens received (``token_ids``) and text (``chars``), and, at the end,
    ``done`` with the usage the client pays for."""

    job_id: str = ""
    miner: str = ""
    token_ids: list[int] = field(default_factory=list)
    chars: int = 0
    prompt_tokens: int = 0
    done: RouteDone | None = None


def _error(message: RouteError) -> ApiError:
    e = message.error
    return ApiError(message.status, e.message, code=e.code, param=e.param, type=e.type)


def _lost() -> ApiError:
    return ApiError(502, "The connection to the coordinator was lost.",
                    code="coordinator_unreachable", type="server_error")


class SealedChannel:
    """End-to-end encrypted requests to the coordinator at ``coordinator`` (http(s) URL)
    under ``api_key``. ``private`` maps model names to private models' codecs: their
    prompts go out as permuted token ids, and their answers come back as ids decoded here.

    Use :meth:`stream` per request; the channel connects on first use and reconnects after
    a loss. Raises :class:`~covey.protocol.errors.ApiError` in OpenAI's terms.
    """

    def __init__(self, coordinator: str, api_key: str,
                 private: Mapping[str, TokenCodec] | None = None) -> None:
        base = coordinator.rstrip("/")
        self.url = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) \
            + "/v1/sealed"
        self.api_key = api_key
        self.private = dict(private or {})
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._inbox: dict[str, asyncio.Queue[_Msg | None]] = {}
        self._keys: dict[str, tuple[bytes, float]] = {}
        self._ids = itertools.count(1)
        self._failure: ApiError | None = None

    async def close(self) -> None:
        """Close the connection (requests still running fail)."""
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _connect(self) -> ClientConnection:
        async with self._connect_lock:
            if self._ws is not None and self._reader is not None and not self._reader.done():
                return self._ws
            try:
                self._ws = await websockets.connect(
                    self.url, additional_headers={"Authorization": f"Bearer {self.api_key}"},
                    max_size=2**26, compression=None, open_timeout=10)
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                raise ApiError(502, f"Cannot reach the coordinator at {self.url}: {exc}",
                               code="coordinator_unreachable", type="server_error") from None
            self._failure = None
            self._reader = asyncio.create_task(self._read(self._ws))
            return self._ws

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                try:
                    message = SERVER_MESSAGE.validate_json(raw)
                except ValidationError:
                    log.warning("the coordinator sent a message this client does not know")
                    continue
                if isinstance(message, CheckRoute):
                    await self._answer_check(message)
                    continue
                queue = self._inbox.get(message.id)
                if queue is not None:
                    queue.put_nowait(message)
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == 4401:
                self._fail_all(ApiError(401, exc.rcvd.reason, code="invalid_api_key"))
                return
        finally:
            for queue in self._inbox.values():
                queue.put_nowait(None)

    def _fail_all(self, error: ApiError) -> None:
        self._failure = error
        for queue in self._inbox.values():
            queue.put_nowait(None)

    async def _send(self, message: _Msg) -> None:
        ws = await self._connect()
        async with self._send_lock:
            try:
                await ws.send(message.model_dump_json())
            except websockets.ConnectionClosed:
                raise _lost() from None

    async def _answer_check(self, route: CheckRoute) -> None:
        """Seal a finished request's session key to the validator the coordinator chose,
        after checking that the validator's key is its own."""
        now = time.monotonic()
        self._keys = {k: v for k, v in self._keys.items() if v[1] > now}
        entry = self._keys.pop(route.id, None)
        sealed = None
        if entry is not None:
            try:
                box = verify_route(route.miner, route.box_key, route.box_signature)
                sealed = seal_key(box, entry[0])
            except SealingError as exc:
                log.warning("not sealing request %s's key to a validator: %s", route.id, exc)
        with contextlib.suppress(ApiError):
            await self._send(CheckKey(id=route.id, sealed_key=sealed))

    def _content(self, job: Generate) -> tuple[SealedContent, PrivateDecoder | None]:
        codec = self.private.get(job.model)
        if codec is None:
            return SealedContent(messages=job.messages, prompt=job.prompt,
                                 stop=job.params.stop), None
        if job.messages is not None:
            ids = codec.chat_ids([{"role": m.role, "content": m.content} for m in job.messages])
        else:
            ids = codec.prompt_ids(job.prompt or "")
        # The miner sees ids alone: stop strings are found here, in the decoded text.
        return (SealedContent(prompt_ids=tuple(ids), stop_ids=tuple(codec.stop_ids)),
                codec.decoder(job.params.stop))

    async def stream(self, job: Generate, chat: bool = True, check: bool = True,
                     answer: Answer | None = None) -> AsyncIterator[str]:
        """Run ``job`` (its ``messages`` or ``prompt`` and ``params``) sealed, yielding the
        answer's text as it arrives; ``answer`` (if given) is filled in as it runs.
        ``check`` False keeps it from being re-checked.

        Raises:
            ApiError: the coordinator's or a miner's error, a route not signed by its miner
                (502 ``route_signature_invalid``), an answer that does not open (502
                ``invalid_ciphertext``), or a lost connection.
        """
        answer = answer if answer is not None else Answer()
        content, decoder = self._content(job)
        request_id = f"r{next(self._ids)}"
        queue: asyncio.Queue[_Msg | None] = asyncio.Queue()
        self._inbox[request_id] = queue
        size = len(content.model_dump_json(exclude_defaults=True).encode())
        if size > MAX_BODY_BYTES:  # the coordinator's cap on request bodies, for both
            raise too_large()
        finished = False
        try:
            await self._send(RouteRequest(id=request_id, model=job.model,
                                          params=job.params.model_copy(update={"stop": ()}),
                                          size=max(size, 1), chat=chat, check=check,
                                          token_ids=decoder is not None))
            key = b""
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        message = await queue.get()
                except TimeoutError:
                    raise ApiError(504, f"The coordinator sent nothing for {IDLE_TIMEOUT:.0f} s.",
                                   code="coordinator_timeout", type="server_error") from None
                if message is None:
                    raise self._failure or _lost()
                if isinstance(message, Route):
                    key = await self._seal(message, content, answer, decoder is not None)
                elif isinstance(message, RouteStarted):
                    answer.prompt_tokens = answer.prompt_tokens or message.prompt_tokens
                elif isinstance(message, SealedDelta):
                    text, ids = self._open(key, message)
                    answer.token_ids.extend(ids)
                    answer.chars += len(text)
                    if decoder is not None:
                        text = decoder.feed(ids)
                    if text:
                        yield text
                    if decoder is not None and decoder.stopped:
                        # A stop string: the cancel below stops the miner.
                        answer.done = RouteDone(id=request_id, finish_reason="stop",
                                                prompt_tokens=answer.prompt_tokens,
                                                completion_tokens=len(answer.token_ids))
                        return
                elif isinstance(message, RouteDone):
                    finished = True
                    if decoder is not None and (tail := decoder.finish()):
                        yield tail
                    answer.done = message
                    if check and key:
                        self._keys[request_id] = (key, time.monotonic() + KEY_TTL)
                    return
                elif isinstance(message, RouteError):
                    finished = True
                    raise _error(message)
        finally:
            self._inbox.pop(request_id, None)
            if not finished:
                with contextlib.suppress(ApiError):
                    await self._send(CancelRequest(id=request_id))

    async def _seal(self, route: Route, content: SealedContent, answer: Answer,
                    private: bool) -> bytes:
        """Check ``route`` and send the job sealed to it (with the resume point after a
        failover); returns the session key."""
        try:
            box = verify_route(route.miner, route.box_key, route.box_signature)
        except SealingError as exc:
            raise ApiError(502, f"{exc}. The coordinator may be trying to read this "
                           "request.", code="route_signature_invalid",
                           type="server_error") from None
        if answer.token_ids:
            # A private model's miner emits no text, so there is none to skip.
            content = content.model_copy(update={"resume": Resume(
                token_ids=tuple(answer.token_ids), text_chars=0 if private else answer.chars)})
        sealed, key = seal_job(box, content)
        answer.job_id, answer.miner = route.job_id, route.miner
        await self._send(SealedJob(id=route.id, sealed=sealed))
        return key

    @staticmethod
    def _open(key: bytes, delta: SealedDelta) -> tuple[str, tuple[int, ...]]:
        try:
            text, ids = open_delta(key, delta.sealed)
        except SealingError as exc:
            raise ApiError(502, str(exc), code="invalid_ciphertext",
                           type="server_error") from None
        if len(ids) != delta.tokens:
            raise ApiError(502, "A sealed delta holds another number of tokens than the "
                           "miner declared for billing.", code="invalid_ciphertext",
                           type="server_error")
        return text, ids


__all__ = ["Answer", "SealedChannel", "TokenCodec"]
