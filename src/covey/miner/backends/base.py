"""The interface every miner backend implements (llama.cpp today; more can follow).

A backend owns one model and runs up to ``slots`` generations at once. The agent only calls
``offer`` and ``generate``; adding a runtime never touches the agent or the coordinator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from covey.protocol import Check, CheckReport, Delta, Done, Job, ModelOffer, Progress, Started


class BackendError(Exception):
    """A job the backend refuses or cannot finish; fields follow OpenAI's error shape.

    ``code`` is e.g. ``context_length_exceeded``; ``param`` names the request field at fault.
    """

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class Backend(ABC):
    """One served model.

    ``generate(job)`` yields exactly one ``Started`` (after tokenizing the prompt, before
    prefill), ``Progress`` frames during a long prefill, then ``Delta`` frames, then one
    ``Done``; it raises :class:`BackendError`
    instead of yielding ``Started`` when the prompt cannot run. Closing the iterator early
    cancels the generation and frees its slot.
    """

    offer: ModelOffer
    slots: int

    @abstractmethod
    def generate(self, job: Job) -> AsyncIterator[Started | Progress | Delta | Done]:
        """Run ``job``; see the class docstring for the frame order."""

    async def check(self, check: Check) -> CheckReport:
        """Re-check another miner's answer as a validator: one teacher-forced prefill over
        prompt + ``check.token_ids``, scored by :mod:`covey.miner.backends.scoring`.

        Raises:
            BackendError: ``check_unsupported`` when this backend cannot re-check, or the
                prompt and answer do not fit the context (``context_length_exceeded``).
        """
        raise BackendError("check_unsupported", "this backend cannot re-check answers")

    watermark_key: bytes | None = None
    """The network's watermark key (32 bytes) from the coordinator's ``welcome``, or None
    when it sent none: jobs with ``params.watermark`` bias sampling with it
    (:mod:`covey.protocol.watermark`)."""

    def set_watermark_key(self, key: bytes | None) -> None:
        """Use ``key`` for watermarked jobs and re-checks from now on (the agent calls this
        on every ``welcome``)."""
        self.watermark_key = key

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` under the model's tokenizer: no BOS, no template, special
        tokens' text read as plain text (watermark detection scores these ids). May be
        called from any thread.

        Raises:
            BackendError: ``tokenize_unsupported`` when this backend has no tokenizer.
        """
        raise BackendError("tokenize_unsupported", "this backend cannot tokenize text")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model's memory and threads."""
