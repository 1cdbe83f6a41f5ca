"""Running one job on a miner: dispatch, frame stream, cancellation and slot release."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from pydantic_core import PydanticSerializationError

from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MINER_GONE, MinerSession
from covey.coordinator.router import Dispatcher
from covey.protocol import Cancel, Delta, Done, Job, JobError, Progress, Started, encode_frame

log = logging.getLogger("covey.coordinator.jobs")

# Miner error codes that describe the request, not the miner; they keep their 400.
_CLIENT_ERROR_CODES = {"context_length_exceeded", "invalid_value", "invalid_prompt"}


def miner_error(frame: JobError) -> ApiError:
    """Map a miner's ``error`` frame to the API error the client sees."""
    if frame.code in _CLIENT_ERROR_CODES:
        return ApiError(400, frame.message, code=frame.code, param=frame.param)
    return ApiError(502, f"The miner failed: {frame.message}", code=frame.code,
                    type="server_error")


def _gone() -> ApiError:
    return ApiError(502, "The miner serving this request disconnected before it finished; "
                    "please retry.", code="miner_disconnected", type="server_error")


class RunningJob:
    """A job dispatched to ``session``; iterate :meth:`frames` for its deltas and done.

    Always call :meth:`close` (it cancels the job on the miner if it is still running, and
    frees the slot); ``async with`` does it.
    """

    def __init__(self, job: Job, payload: str, session: MinerSession, dispatcher: Dispatcher,
                 stall_timeout: float,
                 on_close: Callable[[RunningJob], Awaitable[object] | None] | None = None
                 ) -> None:
        self.job = job
        self.done: Done | None = None
        self.failed = False
        self.delivered = 0
        self.settlement: Awaitable[object] | None = None
        self._on_close = on_close
        self._payload = payload
        self.session = session
        self.started: Started | None = None
        self._dispatcher = dispatcher
        self._stall_timeout = stall_timeout
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._finished = False
        self._closed = False
        session.jobs[job.job_id] = self._queue  # type: ignore[assignment]

    async def __aenter__(self) -> RunningJob:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close()
        if exc_type is None and self.settlement is not None:
            await self.settlement  # the answer is complete: let the charge land before [DONE]

    async def _next(self) -> Started | Delta | Done:
        """The next frame that matters; ``progress`` frames only restart the stall timer."""
        while True:
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that races with a frame, and the job would outlive its departed client.
                async with asyncio.timeout(self._stall_timeout):
                    item = await self._queue.get()
            except TimeoutError:
                self.failed = True
                raise ApiError(504, f"The miner sent nothing for {self._stall_timeout:.0f} s.",
                               code="miner_timeout", type="server_error") from None
            if not isinstance(item, Progress):
                break
        if item is MINER_GONE:
            self.failed = True
            raise _gone()
        if isinstance(item, JobError):
            self._finished = self.failed = True
            raise miner_error(item)
        if isinstance(item, Delta):
            self.delivered += len(item.token_ids)
        elif isinstance(item, Done):
            self.done = item
        assert isinstance(item, Started | Delta | Done)
        return item

    async def send(self) -> Started:
        """Send the job and wait for ``started`` (the prompt fits; prefill begins).

        Raises:
            ApiError: the miner refused the job (e.g. 400 ``context_length_exceeded``),
                disconnected or stalled.
        """
        try:
            await self.session.websocket.send_text(self._payload)
        except Exception as exc:  # the socket died between choice and send
            self.failed = True
            raise _gone() from exc
        frame = await self._next()
        if not isinstance(frame, Started):
            self.failed = True
            raise ApiError(502, "The miner broke the protocol (no 'started' frame).",
                           code="miner_protocol_error", type="server_error")
        self.started = frame
        return frame

    async def frames(self) -> AsyncIterator[Delta | Done]:
        """Deltas, then the final ``done``. Raises :class:`ApiError` like :meth:`send`."""
        while True:
            frame = await self._next()
            if isinstance(frame, Started):
                self.failed = True
                raise ApiError(502, "The miner broke the protocol (second 'started').",
                               code="miner_protocol_error", type="server_error")
            if isinstance(frame, Done):
                self._finished = True
                yield frame
                return
            yield frame

    def close(self) -> None:
        """Cancel on the miner if unfinished; free the slot. Safe to call twice.

        Synchronous on purpose: it runs while the request's task is being cancelled (the
        client left), where any ``await`` would be cancelled too and the slot would leak.
        """
        if self._closed:
            return
        self._closed = True
        self.session.jobs.pop(self.job.job_id, None)
        if not self._finished and not self.session.closed:
            self.session.send_soon(Cancel(job_id=self.job.job_id))
        self._dispatcher.release(self.session)
        if self._on_close is not None:
            self.settlement = self._on_close(self)


def encode_job(job: Job) -> str:
    """The job's frame as JSON text.

    Raises:
        ApiError: 400 when the request holds text JSON cannot carry (a lone surrogate).
    """
    try:
        return encode_frame(job)
    except PydanticSerializationError as exc:
        raise ApiError(400, "The request holds text that is not valid Unicode "
                       f"({exc}).", code="invalid_value") from None


async def start_job(dispatcher: Dispatcher, job: Job, payload: str, stall_timeout: float,
                    on_close: Callable[[RunningJob], Awaitable[object] | None] | None = None
                    ) -> RunningJob:
    """Reserve a miner for ``job``, send ``payload`` (:func:`encode_job`), and wait until
    the miner has started it.

    ``on_close`` is called once when the job ends, however it ends (see
    :attr:`RunningJob.done`, ``failed``, ``started`` and ``delivered``).

    Raises:
        ApiError: 404/503/429 from routing, or the miner's refusal (see
            :meth:`RunningJob.send`).
    """
    session = await dispatcher.acquire(job.model)
    running = RunningJob(job, payload, session, dispatcher, stall_timeout, on_close)
    try:
        await running.send()
    except BaseException:
        running.close()
        raise
    return running
