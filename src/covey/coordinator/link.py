"""The miner link: the only way the coordinator talks to a miner about a task.

``MinerLink(session).call(task)`` sends the task, owns its reply mailbox, and yields the
miner's replies until the task's last one; it turns a silent miner into ``stalled``, a
closed socket into ``disconnected`` and a frame out of place into ``protocol``
(:class:`~covey.coordinator.job_faults.MinerFault`), an ``error`` frame into
:class:`TaskRefused`, and closing the call before the end into a ``cancel`` for the miner.
Jobs, trials, re-checks, tokenize and embeddings all go through it; nothing else writes to a
miner's socket or its mailbox (``tests/test_layout.py`` keeps it so).

A link is local (the miner's socket is on this coordinator) or remote: a miner on another
replica is a :class:`~covey.coordinator.remote.RemoteSession` whose socket relays over
NATS, through the same interface (the owner relays with the functions at the end of this
module). A chain of shards (:mod:`covey.coordinator.chain`)
calls each of its miners through this link, one ``forward`` step at a time, in binary
frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic_core import PydanticSerializationError

from covey.coordinator.errors import ApiError
from covey.coordinator.job_faults import MinerFault, gone, protocol
from covey.coordinator.miners import MINER_GONE, MinerSession
from covey.protocol import (
    AudioChunk,
    Cancel,
    Check,
    CheckReport,
    Done,
    Embed,
    Embedded,
    Generate,
    JobError,
    KeyChunk,
    MinerId,
    Paint,
    Painted,
    Progress,
    Reply,
    Reshard,
    Score,
    Scored,
    Segment,
    Speak,
    SpeechChunk,
    Spoken,
    Tokenize,
    Tokens,
    Transcribe,
    Transcribed,
    encode_frame,
)
from covey.protocol.shard import Forward, Forwarded, encode_binary

Request = Generate | Embed | Transcribe | Speak | Paint | Score | Check | Tokenize | Forward
"""What a call carries: a task, or a verification or tokenizer request."""

_LAST = (Done, Embedded, CheckReport, Tokens, Transcribed, Spoken, Painted, Scored, Forwarded)
"""Replies that end a call (an ``error`` ends it too, raised as :class:`TaskRefused`)."""


_ENDS = (*_LAST, JobError)


def ends_call(reply: object) -> bool:
    """Whether ``reply`` is a task's last (its answer, or an ``error``)."""
    return isinstance(reply, _ENDS)


class TaskRefused(Exception):
    """The miner answered the call with an ``error`` frame (``frame``)."""

    def __init__(self, frame: JobError) -> None:
        super().__init__(frame.message)
        self.frame = frame


def encode_task(task: Request) -> str:
    """The task's frame as JSON text.

    Raises:
        ApiError: 400 when the request holds text JSON cannot carry (a lone surrogate).
    """
    try:
        return encode_frame(task)
    except PydanticSerializationError as exc:
        raise ApiError(400, "The request holds text that is not valid Unicode "
                       f"({exc}).", code="invalid_value") from None


class Call:
    """One task in flight on one miner: ``async with`` sends it, iterating yields the
    replies (``progress`` frames only restart the stall timer) up to the last one.

    Raises (from iteration): :class:`MinerFault` ``stalled`` after ``stall_timeout`` seconds
    without a frame, ``disconnected``, ``protocol`` (a frame of another task kind);
    :class:`TaskRefused` on an ``error`` frame. :meth:`close` (synchronous, so it works in a
    request being cancelled) forgets the mailbox and cancels an unfinished task on the miner.
    """

    def __init__(self, session: MinerSession, task: Request, stall_timeout: float) -> None:
        self.session = session
        self.task = task
        self.stall_timeout = stall_timeout
        self.finished = False
        """True once the miner sent the task's last reply (or its error)."""
        self._queue: asyncio.Queue[Reply | Forwarded | object] = asyncio.Queue()
        self._open = False

    async def open(self) -> None:
        """Register the mailbox and send the task.

        Raises:
            ApiError: 400, text JSON cannot carry.
            MinerFault: ``disconnected``, the socket died under the send.
        """
        frame: str | bytes = (encode_binary(self.task) if isinstance(self.task, Forward)
                              else encode_task(self.task))
        session = self.session
        if session.closed:
            raise gone()
        session.jobs[self.task.job_id] = self._queue
        self._open = True
        try:
            if not session.welcomed.is_set():
                await session.welcomed.wait()
            if isinstance(frame, bytes):
                await session.websocket.send_bytes(frame)
            else:
                await session.websocket.send_text(frame)
        except Exception as exc:  # any transport's error: the socket died
            self.close()
            raise gone() from exc

    async def send(self, frame: AudioChunk | KeyChunk) -> None:
        """Send a frame that follows the task (a transcription's audio, a score's
        evaluation keys).

        Raises:
            MinerFault: ``disconnected``, the socket died under the send.
        """
        if self.session.closed:
            raise gone()
        try:
            await self.session.websocket.send_text(encode_frame(frame))
        except Exception as exc:  # any transport's error: the socket died
            raise gone() from exc

    async def __aenter__(self) -> Call:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Reply | Forwarded]:
        return self

    async def __anext__(self) -> Reply | Forwarded:
        if self.finished:
            raise StopAsyncIteration
        return await self.next()

    async def next(self) -> Reply | Forwarded:
        """The next reply that matters (see the class docstring for what it raises)."""
        queue = self._queue
        while True:
            if not queue.empty():  # frames that came together: no timer to arm for them
                item = queue.get_nowait()
            else:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancellation that races with a frame, and the task would outlive its
                    # departed client.
                    async with asyncio.timeout(self.stall_timeout):
                        item = await queue.get()
                except TimeoutError:
                    raise MinerFault("stalled", ApiError(
                        504, f"The miner sent nothing for {self.stall_timeout:.0f} s.",
                        code="miner_timeout", type="server_error")) from None
            if not isinstance(item, Progress):
                break
        if item is MINER_GONE:
            raise gone()
        if isinstance(item, JobError):
            self.finished = True
            raise TaskRefused(item)
        if not self._fits(item):
            raise protocol(f"a {getattr(item, 'type', 'stray')} frame answering a "
                           f"{self.task.type}")
        if isinstance(item, _LAST):
            self.finished = True
        return item  # type: ignore[return-value]

    def _fits(self, item: object) -> bool:
        match self.task:
            case Generate():
                return not isinstance(item, Embedded | CheckReport | Tokens)
            case Embed():
                return isinstance(item, Embedded)
            case Check():
                return isinstance(item, CheckReport)
            case Tokenize():
                return isinstance(item, Tokens)
            case Transcribe():
                return isinstance(item, Segment | Transcribed)
            case Speak():
                return isinstance(item, SpeechChunk | Spoken)
            case Paint():
                return isinstance(item, Painted)
            case Score():
                return isinstance(item, Scored)
            case Forward():
                return isinstance(item, Forwarded)
        return False  # pragma: no cover - the union is closed

    def close(self) -> None:
        """Forget the mailbox; cancel the task on the miner unless it finished. Idempotent."""
        if not self._open:
            return
        self._open = False
        session = self.session
        session.jobs.pop(self.task.job_id, None)
        if not self.finished and not session.closed:
            session.send_soon(Cancel(job_id=self.task.job_id))


class MinerLink:
    """The link to one miner (local: its socket is on this coordinator)."""

    def __init__(self, session: MinerSession) -> None:
        self.session = session

    @property
    def miner_id(self) -> MinerId:
        """The miner's id (its hex public key)."""
        return self.session.miner_id

    def end_session(self, session: str) -> None:
        """Tell a shard miner that chain session ``session`` ended (it frees the KV
        cache); nothing when the miner is gone."""
        if not self.session.closed:
            self.session.send_soon(Cancel(job_id=session))

    def reshard(self, model: str, start: int, end: int) -> None:
        """Ask a shard miner to load blocks ``start:end`` of ``model`` instead (it
        reconnects with a new hello); nothing when it is gone."""
        if not self.session.closed:
            self.session.send_soon(Reshard(model=model, start=start, end=end))

    def call(self, task: Request, stall_timeout: float = 30.0) -> Call:
        """A call carrying ``task``; ``async with`` it to send, iterate it for the replies."""
        return Call(self.session, task, stall_timeout)


# --- relaying for other replicas (covey.coordinator.remote) ---------------------------------


def mailbox(session: MinerSession, job_id: str) -> object | None:
    """The reply mailbox open for ``job_id`` on ``session`` (None: none)."""
    return session.jobs.get(job_id)


def open_mailbox(session: MinerSession, job_id: str, box: object) -> None:
    """Route ``session``'s replies to ``job_id`` into ``box`` (anything with
    ``put_nowait``): a task relayed from another replica."""
    session.jobs[job_id] = box  # type: ignore[assignment]


def close_mailbox(session: MinerSession, job_id: str, box: object) -> None:
    """Stop routing ``job_id``'s replies into ``box`` (if it is still the mailbox)."""
    if session.jobs.get(job_id) is box:
        del session.jobs[job_id]


async def send_raw(session: MinerSession, data: bytes, binary: bool) -> None:
    """Send an already encoded frame (a binary one when ``binary``) down ``session``'s
    socket, as another replica's link encoded it.

    Raises:
        Exception: the transport's, when the socket died under the send.
    """
    if not session.welcomed.is_set():
        await session.welcomed.wait()
    if binary:
        await session.websocket.send_bytes(data)
    else:
        await session.websocket.send_text(data.decode())
