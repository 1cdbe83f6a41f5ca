"""What miner backends are: one served model each, declaring the task kinds it can do.

A backend is a :class:`Backend` with ``offer`` (the model, announced in the hello),
``slots`` (tasks it runs at once) and ``capabilities``, the kinds of work it takes:

- ``generate``: :meth:`TextBackend.generate` runs a :class:`~covey.protocol.Generate`;
- ``validate``: :meth:`TextBackend.check` re-checks another miner's answer;
- ``tokenize``: :meth:`TextBackend.tokenize` (watermark detection);
- ``embed``: :meth:`EmbeddingBackend.embed` runs an :class:`~covey.protocol.Embed`;
- ``transcribe``: :meth:`TranscriptionBackend.transcribe` runs a
  :class:`~covey.protocol.Transcribe`;
- ``speak``: :meth:`SpeechBackend.speak` runs a :class:`~covey.protocol.Speak`;
- ``paint``: :meth:`ImageBackend.paint` runs a :class:`~covey.protocol.Paint`;
- ``score``: :meth:`ScoringBackend.score` runs a :class:`~covey.protocol.Score`;
- ``forward``: :meth:`ShardBackendBase.forward` runs one step of a chain session on a
  shard of a model (:class:`~covey.protocol.shard.Forward`).

The agent matches each task on its type and hands it to the backend of its model when that
backend declares the capability, so adding a kind of work never touches the other backends.
Backends are built by name from :mod:`covey.miner.backends.registry`.
"""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import ClassVar, Literal, TypeVar

from covey.protocol import (
    Check,
    CheckReport,
    Delta,
    Done,
    Embed,
    Embedded,
    Generate,
    ModelOffer,
    Paint,
    Painted,
    Progress,
    Score,
    Scored,
    Segment,
    Speak,
    SpeechChunk,
    Spoken,
    Started,
    Transcribe,
    Transcribed,
)
from covey.protocol.shard import Forward, Forwarded

PROGRESS_INTERVAL = 1.0
"""Least seconds between two progress reports a worker thread hands to the event loop."""


def thread_reporter(progress: Callable[[int], None] | None,
                    interval: float = PROGRESS_INTERVAL) -> Callable[[int], None]:
    """A progress callback for a backend's worker thread: hands ``progress`` (which runs on
    the calling event loop) at most one count per ``interval`` seconds. Each hand-off wakes
    the event loop thread, which then contends for the GIL with the worker; one per step
    of a fast model measurably slows it.

    Must be called on the event loop that ``progress`` belongs to."""
    import time

    if progress is None:
        return lambda _done: None
    loop = asyncio.get_running_loop()
    last = float("-inf")

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= interval:
            last = now
            loop.call_soon_threadsafe(progress, done)

    return report


T = TypeVar("T")


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def thread_stream(produce: Callable[[Callable[[T], None], threading.Event], None]
                        ) -> AsyncIterator[T]:
    """Run ``produce(put, cancel)`` in a worker thread and yield what it ``put``s, in
    order, as soon as it does; an exception it raises is raised here. Closing the iterator
    early sets ``cancel`` (the producer checks it between pieces of work) and waits for the
    thread to end, so a backend's slot is free again when the close returns."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue[object] = asyncio.Queue()
    cancel = threading.Event()
    end = object()

    def put(item: object) -> None:
        loop.call_soon_threadsafe(out.put_nowait, item)

    def run() -> None:
        try:
            produce(put, cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the event loop
            put(_Raised(exc))
        finally:
            put(end)

    worker = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        while (item := await out.get()) is not end:
            if isinstance(item, _Raised):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        cancel.set()
        await asyncio.shield(worker)


Capability = Literal["generate", "validate", "tokenize", "embed", "transcribe", "speak", "paint",
                     "score", "forward"]


class BackendError(Exception):
    """A job the backend refuses or cannot finish; fields follow OpenAI's error shape.

    ``code`` is e.g. ``context_length_exceeded``; ``param`` names the request field at fault.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class Backend(ABC):  # noqa: B024 - the capabilities' subclasses hold the abstract methods
    """One served model: ``offer``, ``slots`` and the ``capabilities`` it declares."""

    offer: ModelOffer
    slots: int
    capabilities: ClassVar[frozenset[Capability]] = frozenset()

    watermark_key: bytes | None = None
    """The network's watermark key (32 bytes) from the coordinator's ``welcome``, or None
    when it sent none: jobs with ``params.watermark`` bias sampling with it
    (:mod:`covey.protocol.watermark`)."""

    def set_watermark_key(self, key: bytes | None) -> None:
        """Use ``key`` for watermarked jobs and re-checks from now on (the agent calls this
        on every ``welcome``)."""
        self.watermark_key = key

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model's memory and threads."""


class TextBackend(Backend):
    """A text model (capability ``generate``, and ``validate`` / ``tokenize`` where the
    subclass overrides :meth:`check` / :meth:`tokenize` and declares them).

    ``generate(job)`` yields exactly one ``Started`` (after tokenizing the prompt, before
    prefill), ``Progress`` frames during a long prefill, then ``Delta`` frames, then one
    ``Done``; it raises :class:`BackendError` instead of yielding ``Started`` when the
    prompt cannot run. Closing the iterator early cancels the generation and frees its slot.
    """

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"generate"})

    @abstractmethod
    def generate(self, job: Generate) -> AsyncIterator[Started | Progress | Delta | Done]:
        """Run ``job``; see the class docstring for the frame order."""

    async def check(self, check: Check) -> CheckReport:
        """Re-check another miner's answer as a validator: one teacher-forced prefill over
        prompt + ``check.token_ids``, scored by :mod:`covey.miner.backends.scoring`.

        Raises:
            BackendError: ``check_unsupported`` when this backend cannot re-check, or the
                prompt and answer do not fit the context (``context_length_exceeded``).
        """
        raise BackendError("check_unsupported", "this backend cannot re-check answers")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's tokenizer: no BOS, no template, special
        tokens' text read as plain text (watermark detection scores these ids). May be
        called from any thread.

        Raises:
            BackendError: ``tokenize_unsupported`` when this backend has no tokenizer.
        """
        raise BackendError("tokenize_unsupported", "this backend cannot tokenize text")


class EmbeddingBackend(Backend):
    """An embedding model (capability ``embed``)."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"embed"})

    @abstractmethod
    async def embed(self, task: Embed, progress: Callable[[int], None] | None = None
                    ) -> Embedded:
        """Embed ``task``'s inputs: one vector per input, in order, and the input tokens
        counted by the model's tokenizer (``receipt`` left for the agent to add).
        ``progress`` is told the input tokens done so far during a long task (the agent
        sends them as ``progress`` frames, so the coordinator can tell work from a stall);
        cancelling the call stops the work.

        Raises:
            BackendError: ``context_length_exceeded`` (param ``input``) for an input over
                the model's limit when ``task.truncate`` is not set; ``invalid_value`` for a
                token id outside the vocabulary.
        """


class TranscriptionBackend(Backend):
    """A speech-to-text model (capability ``transcribe``)."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"transcribe"})

    @abstractmethod
    def transcribe(self, task: Transcribe, audio: Path) -> AsyncIterator[Segment | Transcribed]:
        """Transcribe the audio file at ``audio`` (the task's upload, its digest checked)
        from ``task.offset`` seconds on: ``Segment`` frames as they are decoded (``id``
        counting on from the segments before the offset is the coordinator's business:
        they start at 0), then one ``Transcribed`` (``receipt`` left for the agent).
        Closing the iterator early stops the decoding.

        Raises:
            BackendError: ``invalid_value`` (param ``file``) when the file is not audio.
        """


class SpeechBackend(Backend):
    """A text-to-speech model (capability ``speak``); ``offer.voices`` lists its voices."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"speak"})

    @abstractmethod
    def speak(self, task: Speak) -> AsyncIterator[SpeechChunk | Spoken]:
        """Synthesize ``task.input``: ``SpeechChunk`` frames of the encoded file as each
        sentence is ready, then one ``Spoken`` (``receipt`` left for the agent). Closing
        the iterator early stops the synthesis.

        Raises:
            BackendError: ``invalid_value`` (param ``voice``) for a voice not in
                ``offer.voices``.
        """


class ImageBackend(Backend):
    """A text-to-image model (capability ``paint``)."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"paint"})

    @abstractmethod
    async def paint(self, task: Paint, progress: Callable[[int], None] | None = None
                    ) -> Painted:
        """Generate ``task.n`` PNG images, image ``i`` from seed ``task.seed + i``
        (``receipt`` left for the agent); ``progress`` is told the denoising steps done so
        far. Cancelling the call stops the work.

        Raises:
            BackendError: ``invalid_value`` (param ``size``) for a size the model cannot
                make.
        """


class ScoringBackend(Backend):
    """A tabular scoring model (capability ``score``); ``offer.card`` lists its features."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"score"})

    @abstractmethod
    async def score(self, task: Score, keys: bytes | None = None,
                    progress: Callable[[int], None] | None = None) -> Scored:
        """Score ``task`` (``receipt`` left for the agent): plain rows, with a proof per row
        when ``task.proof``, or its encrypted row under the evaluation keys
        ``task.keys_sha256`` (``keys``: those keys' bytes when they came with the task,
        checked against the digest; else the backend must still hold them). ``progress``
        is told the rows proved so far (each proof takes seconds; the coordinator takes a
        silent miner for a stalled one).

        Raises:
            BackendError: ``invalid_value`` (param ``inputs`` or ``encrypted``) for rows
                that do not fit the card or a ciphertext that does not fit the keys;
                ``proof_unavailable`` / ``encrypted_unsupported`` (param ``proof`` /
                ``encrypted``) for a kind of scoring this model cannot do;
                ``keys_missing`` when the keys neither came nor are held.
        """


class ShardBackendBase(Backend):
    """A block range of a model (capability ``forward``): ``offer.shard`` says which."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({"forward"})

    @abstractmethod
    async def forward(self, task: Forward) -> Forwarded:
        """Run one step of ``task.session`` through this shard's blocks.

        Raises:
            BackendError: the step does not fit the shard or its session (``invalid_value``),
                or the prompt does not fit the model (``invalid_prompt``,
                ``context_length_exceeded``).
        """

    def drop(self, session: str) -> None:  # noqa: B027 - optional hook
        """Forget ``session``'s cache (its generation ended)."""

    def moved(self, start: int, end: int) -> ShardBackendBase:
        """A backend like this one holding blocks ``start:end`` instead (slow: it loads
        them; run it off the event loop).

        Raises:
            ValueError: the range does not fit the model, or this backend cannot move.
        """
        raise ValueError(f"{type(self).__name__} cannot load other blocks")
