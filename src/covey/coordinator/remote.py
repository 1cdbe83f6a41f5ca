"""Miners on other replicas: the registry shared over NATS, and remote miner links.

Several coordinator replicas serve one network. A miner's socket is on one replica (its
*owner*); every replica can route a task to it:

- **Registry.** Each replica announces its own miners (hello, trial state, stake) on
  ``covey.miners`` every ``interval`` seconds and whenever they change. Other replicas keep
  a :class:`RemoteSession` for each, in the same registry as their own sessions, so the
  router, verification and ``GET /v1/miners`` see the whole network. The registry is soft
  state: a replica that stops announcing (killed) loses its miners elsewhere after
  ``stale_after`` seconds, and those miners reconnect to a live replica. Nothing is
  persisted: the miner that holds a socket is the truth, which NATS pub/sub carries
  without a store.
- **Remote link.** A :class:`RemoteSession`'s socket is :class:`RemoteSocket`: a frame the
  miner link sends (a task, its follow-ups, a cancel) is published to the owner on
  ``covey.to.<owner>``. The owner sends it down the miner's socket and registers a
  :class:`Forwarder` as the task's mailbox, which publishes each reply back on
  ``covey.from.<replica>``; there it lands in the remote session's mailbox, as a local
  reply would. :class:`~covey.coordinator.link.MinerLink` works unchanged: stall timeouts,
  cancel and "miner gone" behave as for a local miner.
- **One session per key.** A miner connecting to a replica replaces a remote session of
  the same key there; closing that remote session tells its owner to drop its own
  (``covey.drop.<owner>``), as a second local session would.

Limits: slots are counted on every replica from the others' reports
(:mod:`covey.coordinator.shared`), so two replicas may still both give a miner its last
slot within one report's time (the miner queues the extra task); a frame above NATS's
payload limit (1 MiB by default) cannot cross replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from covey.coordinator.link import (
    Request,
    close_mailbox,
    ends_call,
    mailbox,
    open_mailbox,
    send_raw,
)
from covey.coordinator.miners import CLOSE_REPLACED, MINER_GONE, MinerRegistry, MinerSession
from covey.protocol import Cancel, Hello, MinerId, decode_frame, encode_frame
from covey.protocol.shard import Forwarded, decode_binary, encode_binary

log = logging.getLogger("covey.coordinator.remote")

ANNOUNCE_S = 2.0
"""Seconds between a replica's announcements of its miners."""
STALE_S = 6.0
"""A replica silent this long has lost its miners on the other replicas."""


def shown(url: str) -> str:
    """``url`` as logs and errors may show it: without a user name, password or token."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


class BusUnavailable(Exception):
    """The replicas' NATS server cannot be reached."""


class RemoteSocket:
    """Stands for a miner's WebSocket on another replica: what is sent goes to ``owner``
    over the bus; closing it asks the owner to drop its session (see the module
    docstring)."""

    def __init__(self, bus: ReplicaBus, owner: str, miner_id: str) -> None:
        self.bus = bus
        self.owner = owner
        self.miner_id = miner_id

    async def send_text(self, text: str) -> None:
        self.bus.publish(f"covey.to.{self.owner}", text.encode(),
                         {"miner": self.miner_id, "from": self.bus.replica})

    async def send_bytes(self, data: bytes) -> None:
        self.bus.publish(f"covey.to.{self.owner}", data,
                         {"miner": self.miner_id, "from": self.bus.replica, "bin": "1"})

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if code == CLOSE_REPLACED:
            self.bus.publish(f"covey.drop.{self.owner}", self.miner_id.encode(), {})


@dataclass(eq=False)
class RemoteSession(MinerSession):
    """A miner whose socket is on replica ``owner`` (:class:`RemoteSocket` carries its
    frames); ``seen`` is when the owner last announced it (``time.monotonic()``)."""

    owner: str = ""
    seen: float = field(default_factory=time.monotonic)
    local: ClassVar[bool] = False


class Forwarder:
    """On the owner: the mailbox of a task sent by replica ``origin``; each reply put in it
    is published back there, and it leaves ``session.jobs`` after the task's last reply."""

    def __init__(self, bus: ReplicaBus, session: MinerSession, origin: str, job_id: str
                 ) -> None:
        self.bus, self.session, self.origin, self.job_id = bus, session, origin, job_id

    def put_nowait(self, item: object) -> None:
        headers = {"miner": self.session.miner_id, "job": self.job_id}
        if item is MINER_GONE:
            self.bus.publish(f"covey.from.{self.origin}", b"", {**headers, "gone": "1"})
            self.end()
            return
        if isinstance(item, Forwarded):
            self.bus.publish(f"covey.from.{self.origin}", encode_binary(item),
                             {**headers, "bin": "1"})
        else:
            self.bus.publish(f"covey.from.{self.origin}",
                             encode_frame(item).encode(), headers)  # type: ignore[arg-type]
        if ends_call(item):
            self.end()

    def end(self) -> None:
        close_mailbox(self.session, self.job_id, self)


class ReplicaBus:
    """This replica's side of the bus: announces ``registry``'s own miners, mirrors the
    other replicas' as :class:`RemoteSession` entries, and carries tasks both ways.

    ``replica``: this replica's id; ``url``: the NATS server.
    """

    def __init__(self, registry: MinerRegistry, replica: str, url: str,
                 interval: float = ANNOUNCE_S, stale_after: float = STALE_S) -> None:
        self.registry = registry
        self.replica = replica
        self.url = url
        self.interval = interval
        self.stale_after = stale_after
        self._nc: Any = None
        self._outbox: asyncio.Queue[tuple[str, bytes, dict[str, str]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._replicas: dict[str, float] = {}

    async def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; once connected, a lost connection is retried for ever.

        Raises:
            BusUnavailable: the NATS server could not be reached within ``timeout`` s.
        """
        import nats

        async def quiet(exc: Exception) -> None:
            log.warning("NATS at %s: %s", shown(self.url), exc or type(exc).__name__)

        try:
            async with asyncio.timeout(timeout):
                self._nc = await nats.connect(self.url, name=f"covey-{self.replica}",
                                              max_reconnect_attempts=-1,
                                              reconnect_time_wait=0.5, connect_timeout=2,
                                              error_cb=quiet)
        except (TimeoutError, OSError, ValueError) as exc:
            raise BusUnavailable(f"cannot reach NATS at {shown(self.url)} "
                                 f"({exc or 'timed out'})"
                                 ) from None
        await self._nc.subscribe(f"covey.to.{self.replica}", cb=self._on_task)
        await self._nc.subscribe(f"covey.from.{self.replica}", cb=self._on_reply)
        await self._nc.subscribe(f"covey.drop.{self.replica}", cb=self._on_drop)
        await self._nc.subscribe("covey.miners", cb=self._on_announce)
        self.registry.on_change.append(self._changed.set)
        self._tasks = [asyncio.create_task(self._sender()),
                       asyncio.create_task(self._announcer())]

    async def close(self) -> None:
        """Send what is queued, say this replica's miners are gone, and disconnect."""
        for task in self._tasks:
            task.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                while not self._outbox.empty():
                    subject, data, headers = self._outbox.get_nowait()
                    await self._nc.publish(subject, data, headers=headers or None)
                await self._nc.publish("covey.miners", json.dumps(
                    {"replica": self.replica, "miners": []}).encode())
                await self._nc.drain()

    async def subscribe(self, subject: str, cb: Any) -> None:
        """Call ``cb(msg)`` (a coroutine function) for each message on ``subject``; the
        message's ``respond(data)`` answers an :meth:`ask`."""
        await self._nc.subscribe(subject, cb=cb)

    async def ask(self, subject: str, data: bytes, timeout: float) -> bytes | None:
        """The first answer to ``data`` on ``subject`` (None: nobody answered within
        ``timeout`` seconds, or nobody listens)."""
        try:
            return (await self._nc.request(subject, data, timeout=timeout)).data
        except Exception:  # noqa: BLE001 - nats-py's timeout and no-responders errors alike
            return None

    def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        """Queue a message; one sender keeps the order messages were queued in."""
        self._outbox.put_nowait((subject, data, headers))

    async def _sender(self) -> None:
        while True:
            subject, data, headers = await self._outbox.get()
            try:
                await self._nc.publish(subject, data, headers=headers or None)
            except Exception as exc:  # noqa: BLE001 - a lost message: the stall timer fails it
                log.warning("could not publish to %s: %s", subject, exc)

    # --- the registry ------------------------------------------------------------------

    def _own(self) -> list[MinerSession]:
        return [s for s in self.registry.sessions.values()
                if not isinstance(s, RemoteSession) and not s.closed]

    async def _announcer(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._changed.wait()
                await asyncio.sleep(0.05)  # gather a burst of changes into one message
            self._changed.clear()
            miners = [{"hello": s.hello.model_dump(mode="json"), "held": sorted(s.held),
                       "refused": sorted(s.refused),
                       "stake": self.registry.stakes.get(s.miner_id, 0)}
                      for s in self._own()]
            self.publish("covey.miners", json.dumps(
                {"replica": self.replica, "miners": miners}).encode(), {})
            self._expire()

    def _expire(self) -> None:
        now = time.monotonic()
        for session in list(self.registry.sessions.values()):
            if isinstance(session, RemoteSession) and now - session.seen > self.stale_after:
                log.warning("replica %s went silent; dropping its miner %s", session.owner,
                            session.miner_id[:16])
                self.registry.remove(session)

    async def _on_announce(self, msg: Any) -> None:
        body = json.loads(msg.data)
        owner = body["replica"]
        if owner == self.replica:
            return
        now = time.monotonic()
        listed = set()
        for entry in body["miners"]:
            hello = Hello.model_validate(entry["hello"])
            listed.add(hello.public_key)
            current = self.registry.sessions.get(hello.public_key)
            if current is not None and not isinstance(current, RemoteSession):
                continue  # connected here: the local session is the truth
            self.registry.stakes[hello.public_key] = int(entry.get("stake", 0))
            if isinstance(current, RemoteSession) and current.owner == owner \
                    and current.hello == hello:
                current.seen = now
                held, refused = set(entry["held"]), set(entry["refused"])
                if (held, refused) != (current.held, current.refused):
                    current.held, current.refused = held, refused
                    self.registry.notify()  # what it may serve changed
                continue
            if current is not None:
                self.registry.remove(current)
            session = RemoteSession(
                miner_id=MinerId(hello.public_key), hello=hello,
                websocket=RemoteSocket(self, owner, hello.public_key),  # type: ignore[arg-type]
                held=set(entry["held"]), refused=set(entry["refused"]), owner=owner)
            session.welcomed.set()
            self.registry.sessions[session.miner_id] = session
            self.registry.notify()
        for session in list(self.registry.sessions.values()):
            if isinstance(session, RemoteSession) and session.owner == owner \
                    and session.miner_id not in listed:
                self.registry.remove(session)

    async def _on_drop(self, msg: Any) -> None:
        session = self.registry.sessions.get(msg.data.decode())
        if session is None or isinstance(session, RemoteSession):
            return
        log.info("miner %s connected to another replica; dropping this session",
                 session.miner_id[:16])
        self.registry.evictions("replaced")
        self.registry.remove(session)
        with contextlib.suppress(Exception):
            await session.websocket.close(code=CLOSE_REPLACED,
                                          reason="replaced by a new session with the same key")

    # --- tasks -------------------------------------------------------------------------

    async def _on_task(self, msg: Any) -> None:
        """On the owner: a frame for one of its miners from another replica."""
        headers = msg.headers or {}
        miner_id, binary = headers.get("miner", ""), headers.get("bin") == "1"
        origin = headers.get("from", "")
        try:
            frame = decode_binary(msg.data) if binary else decode_frame(msg.data.decode())
        except ValueError:
            log.warning("a malformed frame came over the bus for miner %s", miner_id[:16])
            return
        job_id = getattr(frame, "job_id", None)
        session = self.registry.sessions.get(miner_id)
        if session is None or session.closed or isinstance(session, RemoteSession):
            if job_id is not None and isinstance(frame, Request):
                self.publish(f"covey.from.{origin}", b"",
                             {"miner": miner_id, "job": job_id, "gone": "1"})
            return
        if isinstance(frame, Cancel):
            box = mailbox(session, frame.job_id)
            if isinstance(box, Forwarder):
                box.end()
        elif job_id is not None and isinstance(frame, Request):
            open_mailbox(session, job_id, Forwarder(self, session, origin, job_id))
        try:
            await send_raw(session, msg.data, binary)
        except Exception:  # noqa: BLE001 - the socket died under the send
            box = mailbox(session, job_id or "")
            if isinstance(box, Forwarder):
                box.put_nowait(MINER_GONE)

    async def _on_reply(self, msg: Any) -> None:
        """On the requester: a miner's reply relayed by its owner."""
        headers = msg.headers or {}
        session = self.registry.sessions.get(headers.get("miner", ""))
        if session is None:
            return
        queue = mailbox(session, headers.get("job", ""))
        if queue is None:
            return  # a late frame of a task that ended here
        if headers.get("gone") == "1":
            queue.put_nowait(MINER_GONE)  # type: ignore[attr-defined]
            return
        try:
            frame = decode_binary(msg.data) if headers.get("bin") == "1" else \
                decode_frame(msg.data.decode())
        except ValueError:
            log.warning("a malformed reply came over the bus from miner %s",
                        session.miner_id[:16])
            return
        queue.put_nowait(frame)  # type: ignore[attr-defined]
