"""``/v1/sealed``: the WebSocket that carries end-to-end encrypted requests.

The coordinator routes, bills and re-checks these requests like any other, but sees only
their public settings (:mod:`covey.protocol.e2e`): the content is sealed by the client to
the miner the coordinator picked, and the answer sealed by the miner to the client. Nothing
here can open either box; nothing here writes one to a log or the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from covey.coordinator.api.requests import new_id, watermarked
from covey.coordinator.api.serving import Serving
from covey.coordinator.errors import ApiError
from covey.coordinator.jobs import RunningJob
from covey.coordinator.metrics import RequestRecord
from covey.coordinator.miners import MinerSession
from covey.protocol import Delta, Generate
from covey.protocol.e2e import (
    CLIENT_MESSAGE,
    KEY_SUBPROTOCOL,
    SUBPROTOCOL,
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
from covey.protocol.errors import from_validation_errors

log = logging.getLogger("covey.coordinator.sealed")
router = APIRouter()

SEAL_TIMEOUT = 10.0
"""Seconds the client has to seal a job (or a check's key) once routed; the miner's slot is
held meanwhile, so a silent client must not keep it."""
CLOSE_UNAUTHORIZED = 4401
"""Close code for a channel opened without a valid API key (4000 + HTTP 401)."""
CLOSE_BAD_MESSAGE = 4400
"""Close code for a message that does not parse (4000 + HTTP 400)."""


def _client_gone() -> ApiError:
    return ApiError(499, "The client closed its sealed channel.", code="client_closed",
                    type="invalid_request_error")


class SealedChannel:
    """One client's sealed channel: its requests by ``id``, and the replies they wait for."""

    def __init__(self, ws: WebSocket, account: str, serving: Serving, key: str) -> None:
        self.ws = ws
        self.account = account
        self.key = key
        self.serving = serving
        self._send_lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[tuple[str, str], asyncio.Future[_Msg]] = {}
        self.closed = False

    async def send(self, message: _Msg) -> None:
        """Send one message; a closed channel drops it."""
        if self.closed:
            return
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.ws.send_text(message.model_dump_json())

    async def serve(self) -> None:
        """Read client messages until the client leaves; then cancel its requests.

        A request whose fields are out of range gets its own ``error`` (400 naming the
        field); a message that is not one of the protocol's closes the channel (4400).
        """
        try:
            while True:
                event = await self.ws.receive()
                if event["type"] == "websocket.disconnect":
                    return
                raw = event.get("text") or event.get("bytes") or b""
                try:
                    message = CLIENT_MESSAGE.validate_json(raw)
                except ValidationError as exc:
                    if not self._refuse_request(raw, exc):
                        err = exc.errors()[0]
                        where = ".".join(str(p) for p in err["loc"])
                        await self.ws.close(CLOSE_BAD_MESSAGE, f"bad message: {where}: "
                                            f"{err['msg']}"[:120])
                        return
                    continue
                self._receive(message)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.closed = True
            for task in self._tasks.values():
                task.cancel()
            for future in self._waiting.values():
                if not future.done():  # the sealer or key_for sees the client gone
                    future.set_exception(_client_gone())

    def _refuse_request(self, raw: str | bytes, exc: ValidationError) -> bool:
        """Answer a ``request`` with a bad field by an ``error`` for its id; False when the
        message is not a request with a usable id."""
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        if not isinstance(body, dict) or body.get("type") != "request":
            return False
        request_id = body.get("id")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 64 \
                or request_id in self._tasks:
            return False
        # Drop the union's tag ("request") from each location: ``param`` names the field.
        error = from_validation_errors([{**e, "loc": tuple(e["loc"])[1:]}
                                        for e in exc.errors()])
        asyncio.ensure_future(self.send(RouteError(id=request_id, status=error.status,
                                                   error=error.body().error)))
        return True

    def _receive(self, message: _Msg) -> None:
        if isinstance(message, RouteRequest):
            if message.id in self._tasks:
                asyncio.ensure_future(self.send(RouteError(
                    id=message.id, status=400, error=ApiError(
                        400, f"Request id {message.id!r} is already in use on this channel.",
                        code="invalid_value", param="id").body().error)))
                return
            task = asyncio.create_task(self._run(message))
            self._tasks[message.id] = task
            task.add_done_callback(lambda _t, i=message.id: self._tasks.pop(i, None))
        elif isinstance(message, CancelRequest):
            task = self._tasks.get(message.id)
            if task is not None:
                task.cancel()
        else:
            kind = "job" if isinstance(message, SealedJob) else "check_key"
            future = self._waiting.get((kind, message.id))
            if future is not None and not future.done():
                future.set_result(message)

    async def _reply(self, kind: str, request_id: str, ask: _Msg) -> _Msg:
        """Send ``ask`` and wait for the client's ``kind`` message for ``request_id``.

        Raises:
            ApiError: 408 when the client does not answer within :data:`SEAL_TIMEOUT`.
        """
        future: asyncio.Future[_Msg] = asyncio.get_running_loop().create_future()
        self._waiting[(kind, request_id)] = future
        try:
            await self.send(ask)
            async with asyncio.timeout(SEAL_TIMEOUT):
                return await future
        except TimeoutError:
            raise ApiError(408, f"The client did not seal the request within "
                           f"{SEAL_TIMEOUT:.0f} s of its route.", code="seal_timeout",
                           type="invalid_request_error") from None
        finally:
            self._waiting.pop((kind, request_id), None)

    def _sealer(self, request: RouteRequest, job: Generate):  # noqa: ANN202 - a Sealer
        async def seal(session: MinerSession) -> Generate:
            hello = session.hello
            if hello.box_key is None or hello.box_signature is None:
                raise ApiError(502, "The miner chosen cannot take sealed requests.",
                               code="miner_cannot_seal", type="server_error")
            reply = await self._reply("job", request.id, Route(
                id=request.id, job_id=job.job_id, miner=session.miner_id,
                box_key=hello.box_key, box_signature=hello.box_signature))
            assert isinstance(reply, SealedJob)
            return job.model_copy(update={"sealed": reply.sealed})
        return seal

    def _key_for(self, request_id: str):  # noqa: ANN202 - see RunningJob.key_for
        async def key_for(session: MinerSession) -> str | None:
            hello = session.hello
            if self.closed or hello.box_key is None or hello.box_signature is None:
                return None
            try:
                reply = await self._reply("check_key", request_id, CheckRoute(
                    id=request_id, miner=session.miner_id, box_key=hello.box_key,
                    box_signature=hello.box_signature))
            except ApiError:
                return None
            assert isinstance(reply, CheckKey)
            return reply.sealed_key
        return key_for

    async def _run(self, request: RouteRequest) -> None:
        job = Generate(job_id=new_id("chatcmpl" if request.chat else "cmpl"), model=request.model,
                  params=request.params.model_copy(update={"stop": ()}),
                  prompt_bound=request.size)
        # --watermark MODEL: the flag is public, the miner applies it inside the box
        job = watermarked(job, self.ws.app.state.config.watermark_models)
        record = RequestRecord(job.job_id, job.model, self.account, stream=True)
        try:
            await self._check_key()
            self.serving.admit(record)
            running, _ = await self.serving.start(job, request.chat, record,
                                                  sealer=self._sealer(request, job),
                                                  checkable=request.check,
                                                  text=not request.token_ids)
            running.key_for = self._key_for(request.id)
            await self._stream(request.id, running)
        except ApiError as exc:
            await self.send(RouteError(id=request.id, status=exc.status,
                                       error=exc.body().error))
        except asyncio.CancelledError:
            # The client's cancel (or its leaving): say so, with what it pays for.
            await asyncio.shield(self.send(RouteDone(
                id=request.id, finish_reason="cancelled", prompt_tokens=record.prompt_tokens,
                completion_tokens=record.completion_tokens)))
            raise

    async def _check_key(self) -> None:
        """Re-check the channel's API key before each request: a key revoked while its
        channel is open stops here, and the channel closes (4401).

        Raises:
            ApiError: 401 when the key no longer works.
        """
        try:
            account = await self.serving.billing.account_of(self.key)
        except ApiError as exc:
            asyncio.ensure_future(self.ws.close(CLOSE_UNAUTHORIZED, "The API key was revoked."))
            raise ApiError(401, "This channel's API key was revoked.", code=exc.code,
                           type=exc.type) from None
        assert account == self.account  # a key never moves between accounts

    async def _stream(self, request_id: str, running: RunningJob) -> None:
        assert running.started is not None
        async with running:  # first: a cancel from here on must close the job
            await self.send(RouteStarted(id=request_id,
                                         prompt_tokens=running.started.prompt_tokens))
            async for frame in running.frames():
                if isinstance(frame, Delta):
                    if frame.sealed is None:
                        if frame.text or frame.token_ids:
                            # A miner that answers a sealed job in the clear is broken;
                            # its plaintext goes nowhere, least of all to a log.
                            raise ApiError(502, "The miner answered a sealed request "
                                           "unsealed.", code="miner_protocol_error",
                                           type="server_error")
                        continue
                    await self.send(SealedDelta(id=request_id, sealed=frame.sealed,
                                                tokens=frame.sealed_tokens))
                else:
                    await self.send(RouteDone(
                        id=request_id, finish_reason=frame.finish_reason,
                        prompt_tokens=frame.prompt_tokens,
                        completion_tokens=frame.completion_tokens))


@router.websocket("/v1/sealed")
async def sealed_channel(ws: WebSocket) -> None:
    """Open a sealed channel, authenticated by ``Authorization: Bearer <API key>`` or, from
    a browser (which cannot set headers on a WebSocket), by the subprotocols
    :data:`~covey.protocol.e2e.SUBPROTOCOL` and ``KEY_SUBPROTOCOL + <API key>``; the answer
    names only the first."""
    serving: Serving = ws.app.state.serving
    offered: list[str] = ws.scope.get("subprotocols") or []
    key = next((p.removeprefix(KEY_SUBPROTOCOL) for p in offered
                if p.startswith(KEY_SUBPROTOCOL)), None)
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    try:
        if key is None or "authorization" in ws.headers:
            account = await serving.billing.authenticate(ws)  # type: ignore[arg-type]
            key = ws.headers["authorization"].partition(" ")[2].strip()
        else:
            account = await serving.billing.account_of(key)
    except ApiError as exc:
        await ws.close(CLOSE_UNAUTHORIZED, exc.message[:120])
        return
    await SealedChannel(ws, account, serving, key).serve()
