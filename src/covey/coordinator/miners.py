"""Live miner sessions: the WebSocket handshake, frame routing, liveness and eviction.

Each connected miner is a :class:`MinerSession`. Frames of a job are pushed onto that job's
queue; when a session ends (socket closed, garbage received, heartbeat missed) every job still
open on it receives :data:`MINER_GONE`, so no request waits on a dead miner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from covey.protocol import (
    PROTOCOL_VERSION,
    Challenge,
    Heartbeat,
    Hello,
    MinerId,
    ModelOffer,
    Reply,
    Welcome,
    decode_frame,
    encode_frame,
    verify_hello,
)
from covey.protocol.frames import _Frame
from covey.protocol.sealing import SealingError, verify_route
from covey.protocol.shard import Forwarded, decode_binary

log = logging.getLogger("covey.coordinator.miners")

MINER_GONE = object()
"""Put on a job's queue when its miner's session ends before the job did."""

# RFC 6455 1008: policy violation (bad signature); 1003: unsupported data (garbage frames).
CLOSE_POLICY = 1008
CLOSE_BAD_DATA = 1003
CLOSE_REPLACED = 4001
"""Private-use close code: a newer session of the same miner key took this one's place."""


@dataclass(eq=False)
class MinerSession:
    """One connected, authenticated miner.

    ``active`` counts jobs dispatched and not yet finished (``busy`` per model, each model
    having its own slots: :meth:`slots_for`); ``completed`` counts finished ones;
    ``last_seen`` and ``last_dispatch`` are ``time.monotonic()`` seconds.
    """

    miner_id: MinerId
    hello: Hello
    websocket: WebSocket
    active: int = 0
    completed: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    last_dispatch: float = 0.0
    busy: dict[str, int] = field(default_factory=dict)
    elsewhere: dict[str, int] = field(default_factory=dict)
    """Slots of each model that other replicas' jobs hold (their last reports:
    :mod:`covey.coordinator.shared`)."""
    jobs: dict[str, asyncio.Queue[Reply | object]] = field(default_factory=dict)
    closed: bool = False
    held: set[str] = field(default_factory=set)
    """Models this miner serves that get no jobs until it passes a trial for them."""
    refused: set[str] = field(default_factory=set)
    """Models this miner failed its trial for: never routed to this session."""
    welcomed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the ``welcome`` went out: jobs may be sent from then on."""
    local: ClassVar[bool] = True
    """Whether this coordinator holds the miner's socket (a replica's mirror of another
    replica's miner does not)."""

    @property
    def slots(self) -> int:
        """Slots over all the miner's models."""
        return sum(self.slots_for(m.name) for m in self.hello.models)

    def slots_for(self, model: str) -> int:
        """Tasks of ``model`` the miner runs at once (its offer's, else the hello's)."""
        offer = self.claim(model)
        return offer.slots if offer is not None and offer.slots else self.hello.slots

    def free_for(self, model: str) -> bool:
        """Whether a slot of ``model`` is free (the session still open)."""
        return not self.closed and (self.busy.get(model, 0) + self.elsewhere.get(model, 0)
                                    < self.slots_for(model))

    def offer(self, model: str) -> ModelOffer | None:
        """The miner's offer for ``model``, or None when it does not serve it whole (or
        may not yet: held for a trial, or refused after failing one). A shard of the model
        is not an offer of it: see :meth:`shard_offer`."""
        if model in self.held or model in self.refused:
            return None
        offer = self.claim(model)
        return offer if offer is not None and offer.shard is None else None

    def shard_offer(self, model: str) -> ModelOffer | None:
        """The miner's offer of a shard (block range) of ``model``, or None."""
        if model in self.held or model in self.refused:
            return None
        offer = self.claim(model)
        return offer if offer is not None and offer.shard is not None else None

    def claim(self, model: str) -> ModelOffer | None:
        """What the miner's hello says about ``model``, trial or no trial."""
        # Routing asks this several times per request: an index of the (frozen) hello.
        if self._claims is None:
            self._claims = {}
            for m in self.hello.models:
                self._claims.setdefault(m.name, m)
        return self._claims.get(model)

    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    _claims: dict[str, ModelOffer] | None = None

    async def send(self, frame: _Frame) -> None:
        """Send one frame; raises on a closed socket."""
        await self.websocket.send_text(encode_frame(frame))

    def send_soon(self, frame: _Frame) -> None:
        """Send ``frame`` from a task of its own, ignoring a closed socket (fire and forget)."""

        async def _send() -> None:
            with contextlib.suppress(Exception):
                await self.send(frame)

        task = asyncio.create_task(_send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def fail_open_jobs(self) -> None:
        """Wake every job still open on this session with :data:`MINER_GONE`."""
        for queue in self.jobs.values():
            queue.put_nowait(MINER_GONE)


class MinerRegistry:
    """All live sessions, keyed by miner id (the hex public key).

    ``catalog`` maps the models this network offers by configuration to a default context
    length; with the models live miners serve, they are the known models. A known model with
    no live miner gets 503, an unknown one 404. Nothing a miner says outlives its session.
    """

    def __init__(self, catalog: dict[str, int] | None = None) -> None:
        self.sessions: dict[str, MinerSession] = {}
        self._serving: dict[str, tuple[MinerSession, ...]] = {}
        self._offers: dict[str, tuple[ModelOffer, ...]] = {}
        self.catalog: dict[str, int] = dict(catalog or {})
        self.stakes: dict[str, int] = {}
        """µcr staked by each miner id, kept in step with the ledger by the coordinator."""
        self.on_change: list[Callable[[], None]] = []
        """Called after a miner joins or leaves, or a stake changes."""
        self.evictions: Callable[[str], None] = lambda reason: None
        """Called with a reason each time a miner is evicted (a metrics hook)."""
        self.admission: Callable[[MinerSession], None] = lambda session: None
        """Called with each new session before it can get jobs (the trial hook: it may hold
        models in :attr:`MinerSession.held`)."""

    def set_stake(self, miner_id: str, staked: int) -> None:
        """Record a miner's stake (µcr) after it changed in the ledger."""
        self.stakes[miner_id] = staked
        self.notify()

    def serving(self, model: str) -> tuple[MinerSession, ...]:
        """Live sessions that serve ``model``, in the order they joined.

        Kept per model until the next :meth:`notify`: every request asks several times, and
        a scan costs O(miners), 0.4 ms per request at 1,000 miners. Whoever changes what a
        session serves (``held``, ``refused``) must call :meth:`notify`.
        """
        hit = self._serving.get(model)
        if hit is None:
            hit = self._serving[model] = tuple(
                s for s in self.sessions.values() if not s.closed and s.offer(model))
        return hit

    def offers(self, model: str) -> tuple[ModelOffer, ...]:
        """The offers of :meth:`serving`'s sessions for ``model`` (kept likewise)."""
        hit = self._offers.get(model)
        if hit is None:
            hit = self._offers[model] = tuple(
                o for s in self.serving(model) if (o := s.offer(model)) is not None)
        return hit

    def is_known(self, model: str) -> bool:
        """In the catalog, or offered by a live miner (even one still on trial)."""
        return model in self.catalog or any(
            not s.closed and s.claim(model) for s in self.sessions.values())

    def models(self) -> dict[str, tuple[int, int]]:
        """Known models: name → (live miners, context length in tokens).

        The context length is the largest any live miner offers, else the catalog's.
        """
        out = {name: (0, ctx) for name, ctx in self.catalog.items()}
        for session in self.sessions.values():
            if session.closed:
                continue
            for m in session.hello.models:
                if session.offer(m.name) is None:
                    continue
                n, ctx = out.get(m.name, (0, 0))
                out[m.name] = (n + 1, m.context_length if n == 0 else max(ctx,
                                                                           m.context_length))
        return out

    def announced(self, model: str) -> ModelOffer | None:
        """How a live miner announces ``model`` (its kind, dimensions …), or None when no
        live miner serves it (a catalog model is a chat model)."""
        return next((o for s in self.sessions.values() if not s.closed
                     for o in s.hello.models if o.name == model), None)

    def add(self, session: MinerSession) -> MinerSession | None:
        """Register ``session``; returns the older session of the same key, if any, to close."""
        old = self.sessions.get(session.miner_id)
        self.sessions[session.miner_id] = session
        self.notify()
        return old

    def remove(self, session: MinerSession) -> None:
        """Drop ``session`` (if still current) and fail its open jobs."""
        session.closed = True
        if self.sessions.get(session.miner_id) is session:
            del self.sessions[session.miner_id]
        session.fail_open_jobs()
        self.notify()

    def notify(self) -> None:
        """Tell every :attr:`on_change` callback that the set of miners changed."""
        self._serving.clear()
        self._offers.clear()
        for callback in self.on_change:
            callback()


async def _handshake(ws: WebSocket, timeout: float) -> Hello | None:
    nonce = secrets.token_hex(32)
    await ws.send_text(encode_frame(Challenge(nonce=nonce)))
    try:
        async with asyncio.timeout(timeout):
            raw = await ws.receive_text()
        hello = decode_frame(raw)
    except (TimeoutError, ValidationError, WebSocketDisconnect, KeyError, RuntimeError):
        await _close(ws, CLOSE_POLICY, "expected a hello")
        return None
    if not isinstance(hello, Hello):
        await _close(ws, CLOSE_POLICY, "expected a hello")
        return None
    if hello.protocol_version != PROTOCOL_VERSION:
        await _close(ws, CLOSE_POLICY, f"protocol version {hello.protocol_version} is not "
                     f"supported; this coordinator speaks {PROTOCOL_VERSION}")
        return None
    if hello.nonce != nonce or not verify_hello(hello.model_dump(mode="json")):
        log.warning("refused miner %s: bad hello signature", hello.public_key[:16])
        await _close(ws, CLOSE_POLICY, "bad hello signature")
        return None
    if hello.box_key is not None:
        try:
            verify_route(hello.public_key, hello.box_key, hello.box_signature or "")
        except SealingError:
            log.warning("refused miner %s: box key not signed by it", hello.public_key[:16])
            await _close(ws, CLOSE_POLICY, "box key not signed by the miner's identity")
            return None
    return hello


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await ws.close(code=code, reason=reason)


async def serve_miner(
    ws: WebSocket, registry: MinerRegistry, heartbeat_interval: float, miner_timeout: float,
    watermark_key: bytes | None = None,
) -> None:
    """Run one miner's WebSocket from handshake to goodbye; the ``welcome`` hands the
    miner ``watermark_key`` (the network's, :mod:`covey.protocol.watermark`).

    A miner that sends a frame that does not parse, or a frame of a kind it may not send, is
    disconnected; its open jobs fail with :data:`MINER_GONE`.
    """
    await ws.accept()
    hello = await _handshake(ws, timeout=miner_timeout)
    if hello is None:
        return
    session = MinerSession(miner_id=MinerId(hello.public_key), hello=hello, websocket=ws)
    registry.admission(session)
    old = registry.add(session)
    if old is not None:
        registry.evictions("replaced")
        registry.remove(old)
        await _close(old.websocket, CLOSE_REPLACED, "replaced by a new session with the "
                     "same key")
    log.info("miner %s joined: %s, %d slots", session.miner_id[:16],
             ", ".join(m.name for m in hello.models), hello.slots)
    pinger = asyncio.create_task(_heartbeats(session, heartbeat_interval, miner_timeout, registry))
    try:
        await session.send(Welcome(miner_id=session.miner_id,
                                   heartbeat_interval=heartbeat_interval,
                                   watermark_key=watermark_key.hex() if watermark_key else None))
        session.welcomed.set()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            session.last_seen = time.monotonic()
            try:
                # Binary messages are shard steps' answers (tensors as raw bytes).
                data = message.get("bytes")
                frame = decode_binary(data) if data is not None else decode_frame(
                    message.get("text") or "")
            except ValueError:  # pydantic's ValidationError is one
                log.warning("miner %s sent a malformed frame; disconnecting", session.miner_id[:16])
                registry.evictions("malformed_frame")
                await _close(ws, CLOSE_BAD_DATA, "malformed frame")
                return
            if isinstance(frame, Heartbeat):
                continue
            if isinstance(frame, Reply | Forwarded):
                queue = session.jobs.get(frame.job_id)
                if queue is not None:  # late frames of a cancelled job are dropped
                    queue.put_nowait(frame)
                continue
            log.warning("miner %s sent a %s frame; disconnecting", session.miner_id[:16],
                        frame.type)
            registry.evictions("unexpected_frame")
            await _close(ws, CLOSE_BAD_DATA, f"unexpected {frame.type} frame")
            return
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        pinger.cancel()
        registry.remove(session)
        log.info("miner %s left", session.miner_id[:16])


async def _heartbeats(
    session: MinerSession, interval: float, timeout: float, registry: MinerRegistry
) -> None:
    """Ping the miner every ``interval`` s; evict it once silent for ``timeout`` s.

    Silence is checked every second (or every ``interval`` if shorter), so eviction comes at
    most a second after the timeout, whatever the ping interval.
    """
    tick = min(1.0, interval)
    next_ping = time.monotonic() + interval
    try:
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - session.last_seen > timeout:
                log.warning("miner %s silent for %.0f s; evicting", session.miner_id[:16],
                            now - session.last_seen)
                registry.evictions("heartbeat_timeout")
                registry.remove(session)
                await _close(session.websocket, 1001, "heartbeat timeout")
                return
            if now >= next_ping:
                next_ping = now + interval
                await session.send(Heartbeat(active=session.active))
    except (WebSocketDisconnect, RuntimeError, OSError):
        registry.remove(session)
