"""The miner agent: connect out, sign the hello, heartbeat, run jobs, reconnect on loss.

The agent speaks only the wire protocol and the :class:`~covey.miner.backends.base.Backend`
interface. One agent serves several models, one backend each, announced in one ``hello``;
each model runs up to its backend's ``slots`` tasks at once. A task goes to the backend of
its model when that backend declares the task's capability (``generate``, ``embed``,
``validate``, ``tokenize``); anything else is answered with an ``error`` frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import websockets
from nacl.public import PrivateKey
from nacl.signing import SigningKey
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from covey import __version__
from covey.miner.backends.base import (
    Backend,
    BackendError,
    Capability,
    EmbeddingBackend,
    ShardBackendBase,
    TextBackend,
)
from covey.miner.hardware import detect_hardware
from covey.miner.media_tasks import MediaTasks
from covey.miner.sealed_jobs import unsealed, unsealed_check
from covey.protocol import (
    AudioChunk,
    Cancel,
    Challenge,
    Check,
    Delta,
    Done,
    Embed,
    Embedded,
    Generate,
    Heartbeat,
    Hello,
    JobError,
    KeyChunk,
    ModelOffer,
    Paint,
    Painted,
    Reshard,
    Score,
    Scored,
    Speak,
    Spoken,
    Started,
    Tokenize,
    Tokens,
    Transcribe,
    Transcribed,
    Welcome,
    decode_frame,
    encode_frame,
    sign_hello,
)
from covey.protocol.embed import vectors_digest
from covey.protocol.frames import Receipt, _Frame
from covey.protocol.receipts import billed_units, billed_work, request_digest, sign_receipt
from covey.protocol.sealing import SealingError, open_job, seal_delta, sign_box_key
from covey.protocol.shard import (
    CHAIN_START,
    Forward,
    chain_digest,
    decode_binary,
    encode_binary,
    session_receipt,
)

log = logging.getLogger("covey.miner")
T = TypeVar("T")
R = TypeVar("R", Done, Embedded, Transcribed, Spoken, Painted, Scored)

MAX_FRAME_BYTES = 2**26
"""Largest frame accepted (64 MiB); the coordinator caps request bodies well below it."""
MAX_SHARD_SESSIONS = 4096
"""Chain sessions whose receipts a shard miner keeps; the oldest is dropped beyond it."""
MAX_TOKENIZE_IDS = 2**20
"""Most token ids a ``tokens`` frame may carry (its field's bound)."""

# Close codes after which retrying cannot help: our hello was refused.
_FATAL_CLOSE = {1008}
CLOSE_REPLACED = 4001
"""The coordinator's close code for a session replaced by a newer one with the same key."""


class HelloRefused(Exception):
    """The coordinator refused our hello (bad signature or protocol); retrying won't help."""


def ws_url(coordinator: str) -> str:
    """``http(s)://host:port[/prefix]`` → ``ws(s)://host:port[/prefix]/v1/miners/connect``."""
    parts = urlsplit(coordinator if "://" in coordinator else f"http://{coordinator}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"coordinator URL must start with http:// or https://: {coordinator}")
    path = parts.path.rstrip("/") + "/v1/miners/connect"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays in seconds: ``initial`` doubling up to ``cap``, ±``jitter`` share."""

    initial: float = 0.5
    cap: float = 10.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * 2**attempt)
        return base * (1 + random.uniform(-self.jitter, self.jitter))


class MinerAgent(MediaTasks):
    """Serves ``backends`` (one per model; a single backend is accepted too) to the
    coordinator at ``coordinator_url`` under ``key``. Several URLs (replicas of one
    network) are tried in turn: after a lost or refused connection the next one is used.

    Raises (from the constructor):
        ValueError: no backend, or two backends serving the same model name.
    """

    def __init__(self, coordinator_url: str | Sequence[str], key: SigningKey,
                 backends: Backend | Sequence[Backend], backoff: Backoff = Backoff()) -> None:
        urls = [coordinator_url] if isinstance(coordinator_url, str) else list(coordinator_url)
        if not urls:
            raise ValueError("no coordinator URL")
        self.urls = [ws_url(u) for u in urls]
        self.url = self.urls[0]
        self.key = key
        served = [backends] if isinstance(backends, Backend) else list(backends)
        self.backends: dict[str, Backend] = {b.offer.name: b for b in served}
        if not served or len(self.backends) != len(served):
            raise ValueError("each model must be served by exactly one backend")
        self.backoff = backoff
        self.miner_id = key.verify_key.encode().hex()
        # A fresh box key per process: a sealed job can be opened only by the process it was
        # sealed to, and a stolen key file reveals no past traffic.
        self.box = PrivateKey.generate()
        self.box_signature = sign_box_key(key, self.box.public_key)
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._uploads: dict[str, asyncio.Queue[AudioChunk | KeyChunk]] = {}
        self._pending: set[asyncio.Future[None]] = set()
        self._shard_chains: dict[str, tuple[str, str, int, int]] = {}
        """Chain session → its receipt so far (input and output digest chains,
        positions, steps)."""
        self._send_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._ws: ClientConnection | None = None

    def stop(self) -> None:
        """Leave the coordinator cleanly and make :meth:`run` return (signal-handler safe)."""
        self._stopping.set()
        if self._ws is not None:
            asyncio.ensure_future(self._ws.close(1001, "miner shutting down"))

    def make_hello(self, nonce: str) -> Hello:
        """A hello answering ``nonce``, signed by this miner's key."""
        body = Hello(
            public_key=self.miner_id, nonce=nonce, hardware=detect_hardware(),
            models=tuple(_offer(b) for b in self.backends.values()),
            slots=max(b.slots for b in self.backends.values()), version=__version__,
            box_key=bytes(self.box.public_key).hex(), box_signature=self.box_signature,
            signature="0" * 128,
        ).model_dump(mode="json")
        body["signature"] = sign_hello(self.key, body)
        return Hello.model_validate(body)

    async def run(self) -> None:
        """Connect and serve until :meth:`stop`, reconnecting with backoff when the link drops.

        Raises:
            HelloRefused: the coordinator closed the socket with a policy violation.
        """
        attempt = 0
        while not self._stopping.is_set():
            try:
                async with websockets.connect(self.url, max_size=MAX_FRAME_BYTES, ping_interval=20,
                                              open_timeout=10, compression=None) as ws:
                    self._ws = ws
                    await self._session(ws)
                    attempt = 0
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if code in _FATAL_CLOSE:
                    reason = exc.rcvd.reason if exc.rcvd else ""
                    raise HelloRefused(f"coordinator refused this miner: {reason}") from exc
                if code == CLOSE_REPLACED:
                    # The session this process holds is never the one replaced when it
                    # reconnects itself: another process uses our key. Fighting over it
                    # would flap both off the network.
                    raise HelloRefused(
                        "another miner process connected with this miner's key; give each "
                        "miner its own --data-dir (or --key)") from exc
                log.warning("connection to %s lost (%s)", self.url, exc)
            except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
                log.warning("cannot reach %s: %s", self.url, exc)
            except ValueError as exc:  # pydantic's ValidationError, or a bad binary frame
                what = (exc.errors()[0].get("msg") if isinstance(exc, ValidationError)
                        else str(exc))
                log.warning("coordinator sent a frame this miner does not understand (%s); "
                            "reconnecting", what)
            finally:
                self._ws = None
                await self._cancel_all()
            if self._stopping.is_set():
                return
            # The next replica of the network at once; backing off only once each was tried
            # (one URL: the same again, backing off).
            self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
            if self.url != self.urls[0]:
                delay = self.backoff.delay(0)
            else:
                delay = self.backoff.delay(attempt)
                attempt += 1
            log.info("reconnecting in %.1f s", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _send(self, ws: ClientConnection, frame: _Frame) -> None:
        async with self._send_lock:
            await ws.send(encode_frame(frame))

    def _send_soon(self, ws: ClientConnection, frame: _Frame) -> None:
        """Send ``frame`` from a task of its own (from a callback that cannot await);
        a closed socket is ignored."""

        async def send() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._send(ws, frame)

        task = asyncio.ensure_future(send())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _session(self, ws: ClientConnection) -> None:
        challenge = decode_frame(await ws.recv())
        if not isinstance(challenge, Challenge):
            raise HelloRefused(f"expected a challenge, got {challenge.type}")
        await self._send(ws, self.make_hello(challenge.nonce))
        welcome = decode_frame(await ws.recv())
        if not isinstance(welcome, Welcome):
            raise HelloRefused(f"expected a welcome, got {welcome.type}")
        for backend in self.backends.values():
            backend.set_watermark_key(
                bytes.fromhex(welcome.watermark_key) if welcome.watermark_key else None)
        log.info("connected to %s as %s", self.url, self.miner_id[:16])
        beat = asyncio.create_task(self._heartbeat(ws, welcome.heartbeat_interval))
        try:
            async for raw in ws:
                # Binary messages are shard steps (tensors as raw bytes); text is JSON.
                frame = decode_binary(raw) if isinstance(raw, bytes) else decode_frame(raw)
                work: Coroutine[object, object, None]
                match frame:
                    case Forward():
                        work = self._forward(ws, frame)
                    case Reshard():
                        self._spawn_reshard(ws, frame)
                        continue
                    case Generate():
                        work = self._run_job(ws, frame)
                    case Embed():
                        work = self._embed(ws, frame)
                    case Transcribe():
                        # Registered now: the audio's chunks follow the task at once.
                        inbox: asyncio.Queue[AudioChunk | KeyChunk] = asyncio.Queue()
                        self._uploads[frame.job_id] = inbox
                        work = self._transcribe(ws, frame, inbox)
                    case Score():
                        keys: asyncio.Queue[AudioChunk | KeyChunk] = asyncio.Queue()
                        if frame.keys_bytes is not None:  # its keys follow at once
                            self._uploads[frame.job_id] = keys
                        work = self._score(ws, frame, keys)
                    case AudioChunk() | KeyChunk():
                        upload = self._uploads.get(frame.job_id)
                        if upload is not None:
                            upload.put_nowait(frame)
                        continue
                    case Speak():
                        work = self._speak(ws, frame)
                    case Paint():
                        work = self._paint(ws, frame)
                    case Check():
                        work = self._run_check(ws, frame)
                    case Tokenize():
                        work = self._tokenize(ws, frame)
                    case Cancel():
                        running = self._jobs.get(frame.job_id)
                        if running is not None:
                            running.cancel()
                        else:  # a chain session that ended: free its cache
                            self._shard_chains.pop(frame.job_id, None)
                            for backend in self.backends.values():
                                if isinstance(backend, ShardBackendBase):
                                    backend.drop(frame.job_id)
                        continue
                    case _:
                        continue
                task = asyncio.create_task(self._guarded(ws, frame.job_id, work))
                self._jobs[frame.job_id] = task
                task.add_done_callback(lambda _t, j=frame.job_id: self._forget(j))
                # A task cancelled before it ran never awaited its work: close it quietly.
                task.add_done_callback(lambda _t, w=work: w.close())
        finally:
            beat.cancel()

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._uploads.pop(job_id, None)

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await asyncio.sleep(interval)
                await self._send(ws, Heartbeat(active=len(self._jobs)))

    async def _guarded(self, ws: ClientConnection, job_id: str,
                       work: Coroutine[object, object, None]) -> None:
        """Run a job or a check; any failure becomes an ``error`` frame for ``job_id``."""
        try:
            await work
        except BackendError as exc:
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._send(ws, JobError(job_id=job_id, code=exc.code,
                                              message=exc.message, param=exc.param))
        except asyncio.CancelledError:
            log.info("%s cancelled", job_id)
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:  # a backend bug must fail the job, not the miner
            log.exception("%s failed", job_id)
            with contextlib.suppress(websockets.ConnectionClosed):
                await self._send(ws, JobError(job_id=job_id, code="backend_error",
                                              message=type(exc).__name__))

    def _backend(self, model: str, sha256: str | None, capability: Capability) -> Backend:
        """The backend serving ``model`` (with weights ``sha256`` when given) that can do
        ``capability``.

        Raises:
            BackendError: ``model_not_found`` (another model or other weights), or
                ``<capability>_unsupported`` (the model cannot do that kind of task).
        """
        backend = self.backends.get(model)
        if backend is None or sha256 not in (None, backend.offer.sha256):
            raise BackendError("model_not_found", f"this miner does not serve {model!r}"
                               f" with weights {sha256}", "model")
        if capability not in backend.capabilities:
            raise BackendError(f"{capability}_unsupported", f"{model!r} is a "
                               f"{backend.offer.kind} model: it cannot {capability}", "model")
        return backend

    async def _run_job(self, ws: ClientConnection, job: Generate) -> None:
        backend = self._backend(job.model, job.model_sha256, "generate")
        assert isinstance(backend, TextBackend)
        key: bytes | None = None
        run = job
        if job.sealed is not None:
            content, key = self._open(lambda: open_job(self.box, job.sealed or ""))
            run = unsealed(job, content)
        gen = backend.generate(run)
        sent = hashlib.sha256()
        try:
            async for frame in gen:
                if isinstance(frame, Delta):
                    if key is not None:
                        frame = Delta(job_id=frame.job_id, text="", token_ids=(),
                                      sealed=seal_delta(key, frame.text, frame.token_ids),
                                      sealed_tokens=len(frame.token_ids))
                    sent.update((frame.sealed or frame.text).encode())
                elif isinstance(frame, Done):
                    frame = self._signed(job, frame, backend.offer.sha256, sent.hexdigest())
                elif isinstance(frame, Started) and run.prompt_bound is not None \
                        and frame.prompt_tokens > run.prompt_bound:
                    raise BackendError("invalid_prompt", f"The sealed prompt has "
                                       f"{frame.prompt_tokens} tokens, more than the "
                                       f"{run.prompt_bound} its request declared.", "messages")
                await self._send(ws, frame)
        finally:
            await gen.aclose()

    @staticmethod
    def _open(opener: Callable[[], T]) -> T:
        """Run a :mod:`~covey.protocol.sealing` opener; its failure is the request's fault
        (``invalid_ciphertext``, a 400 for the client), never the miner's."""
        try:
            return opener()
        except SealingError as exc:
            raise BackendError("invalid_ciphertext", str(exc), "sealed") from None

    async def _run_check(self, ws: ClientConnection, check: Check) -> None:
        """Act as validator for ``check``: report the backend's measurements. A sealed
        job's check is opened here with the session key the client sealed to us."""
        backend = self._backend(check.job.model, check.job.model_sha256, "validate")
        assert isinstance(backend, TextBackend)
        if check.sealed_key is not None and check.job.sealed is not None:
            check = self._open(lambda: unsealed_check(self.box, check))
        await self._send(ws, await backend.check(check))

    async def _tokenize(self, ws: ClientConnection, frame: Tokenize) -> None:
        """Answer ``tokenize`` (watermark detection) with the backend's token ids; off the
        event loop, as a long text takes a while."""
        backend = self._backend(frame.model, None, "tokenize")
        assert isinstance(backend, TextBackend)
        ids = await asyncio.to_thread(backend.tokenize, frame.text)
        if len(ids) > MAX_TOKENIZE_IDS:
            raise BackendError("invalid_value", f"the text has {len(ids)} tokens; at most "
                               f"{MAX_TOKENIZE_IDS} can be returned", "text")
        await self._send(ws, Tokens(job_id=frame.job_id, token_ids=tuple(ids)))

    def _spawn_reshard(self, ws: ClientConnection, frame: Reshard) -> None:
        """Load the blocks the coordinator asks for, then reconnect with a new hello (a
        shard served with ``--rebalance`` only)."""
        backend = self.backends.get(frame.model)
        if not isinstance(backend, ShardBackendBase) or not backend.offer.rebalance:
            log.warning("coordinator asked to move %s, which this miner does not allow",
                        frame.model)
            return

        async def move() -> None:
            try:
                new = await asyncio.to_thread(backend.moved, frame.start, frame.end)
            except ValueError as exc:
                log.warning("cannot load blocks %d:%d of %s: %s", frame.start, frame.end,
                            frame.model, exc)
                return
            self.backends[frame.model] = new
            backend.close()
            log.info("now serving blocks %d:%d of %s; reconnecting", frame.start, frame.end,
                     frame.model)
            await ws.close(1012, "resharding")  # 1012: service restart; back at once

        task = asyncio.ensure_future(move())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _forward(self, ws: ClientConnection, task: Forward) -> None:
        """Run one step of a chain session on this miner's shard and answer in binary,
        with a signed receipt for the session so far (the chains of its input and output
        digests, :func:`~covey.protocol.shard.chain_digest`)."""
        backend = self._backend(task.model, task.model_sha256, "forward")
        assert isinstance(backend, ShardBackendBase)
        reply = await backend.forward(task)
        old = self._shard_chains.pop(task.session, None) if task.position else None
        inputs, outputs, positions, steps = old or (CHAIN_START, CHAIN_START, 0, 0)
        state = (chain_digest(inputs, reply.input_sha256),
                 chain_digest(outputs, reply.output_sha256), positions + reply.tokens,
                 steps + 1)
        self._shard_chains[task.session] = state
        while len(self._shard_chains) > MAX_SHARD_SESSIONS:
            self._shard_chains.pop(next(iter(self._shard_chains)))
        receipt = session_receipt(task.session, self.miner_id, backend.offer.sha256, *state)
        reply = reply.model_copy(update={"receipt": receipt,
                                         "signature": sign_receipt(self.key, receipt)})
        async with self._send_lock:
            await ws.send(encode_binary(reply))

    async def _embed(self, ws: ClientConnection, task: Embed) -> None:
        """Run an ``embed`` task and send its vectors with a signed receipt."""
        backend = self._backend(task.model, task.model_sha256, "embed")
        assert isinstance(backend, EmbeddingBackend)

        reply = await backend.embed(task, self._progress(ws, task.job_id))
        await self._send(ws, self._signed(task, reply, backend.offer.sha256,
                                          vectors_digest(reply.vectors)))

    def _signed(self, task: Generate | Embed | Transcribe | Speak | Paint | Score, last: R,
                model_sha256: str, output_sha256: str) -> R:
        """``last`` (a task's final frame) with this miner's signed receipt for ``task``;
        the receipt's ``prompt_tokens`` holds the task's input units (tokens, seconds,
        characters, tiles or rows), its ``completion_tokens`` the output units
        (:func:`~covey.protocol.receipts.billed_work`)."""
        receipt = Receipt(job_id=task.job_id, miner=self.miner_id, model_sha256=model_sha256,
                          request_sha256=request_digest(task), output_sha256=output_sha256,
                          prompt_tokens=billed_units(last), completion_tokens=billed_work(last))
        return last.model_copy(update={"receipt": receipt,
                                       "signature": sign_receipt(self.key, receipt)})

    async def _cancel_all(self) -> None:
        tasks = list(self._jobs.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _offer(backend: Backend) -> ModelOffer:
    """The backend's offer, with its own slot count."""
    return backend.offer.model_copy(update={"slots": backend.slots})
