"""OpenAI response shapes for an answer that arrives in pieces: chat or legacy completion,
whole or streamed as server-sent events.

Shared by the coordinator and the local privacy proxy, which answer alike.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from covey.protocol.frames import Done
from covey.protocol.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    Usage,
)

__all__ = ["SSE_DONE", "ChatFormatter", "CompletionFormatter", "Formatter", "Meta", "sse",
           "unless_client_leaves"]

T = TypeVar("T")


def _usage(done: Done) -> Usage:
    return Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                 total_tokens=done.prompt_tokens + done.completion_tokens)


def _finish(done: Done) -> str:
    return "stop" if done.finish_reason == "cancelled" else done.finish_reason


_MARK = "COVEY_DELTA_TEXT_b41e"


class _DeltaTemplate:
    """A delta chunk rendered once per request with a marker where the text goes.

    Each token then costs one ``json.dumps`` of its text instead of building and serializing
    a pydantic model: on a small machine the coordinator shares the CPU with the decode.
    """

    def __init__(self, rendered: str) -> None:
        self._head, found, self._tail = rendered.rpartition(f'"{_MARK}"')
        assert found, "the template must contain the marker"

    def render(self, text: str) -> str:
        return self._head + json.dumps(text, ensure_ascii=False) + self._tail


@dataclass
class Meta:
    """The response's ``id``, ``created`` (Unix seconds), ``model`` and
    ``system_fingerprint`` (the serving miner)."""

    id: str
    created: int
    model: str
    fingerprint: str


class ChatFormatter:
    """Chat completion shapes (``chat.completion`` / ``chat.completion.chunk``)."""

    def __init__(self, meta: Meta) -> None:
        self.m = meta
        self._delta = _DeltaTemplate(self._chunk(ChatDelta(content=_MARK)))

    def reroute(self, fingerprint: str) -> None:
        """The job moved to another miner: later chunks name it."""
        self.m.fingerprint = fingerprint
        self._delta = _DeltaTemplate(self._chunk(ChatDelta(content=_MARK)))

    def _chunk(self, delta: ChatDelta, finish: str | None = None) -> str:
        return ChatCompletionChunk(
            id=self.m.id, created=self.m.created, model=self.m.model,
            system_fingerprint=self.m.fingerprint,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish)],
        ).model_dump_json()

    def first(self) -> str | None:
        return self._chunk(ChatDelta(role="assistant", content=""))

    def delta(self, text: str) -> str:
        return self._delta.render(text)

    def last(self, done: Done) -> str:
        return self._chunk(ChatDelta(), _finish(done))

    def usage(self, done: Done) -> str:
        return ChatCompletionChunk(
            id=self.m.id, created=self.m.created, model=self.m.model, choices=[],
            system_fingerprint=self.m.fingerprint, usage=_usage(done),
        ).model_dump_json()

    def whole(self, text: str, done: Done) -> ChatCompletion:
        return ChatCompletion(
            id=self.m.id, created=self.m.created, model=self.m.model,
            system_fingerprint=self.m.fingerprint, usage=_usage(done),
            choices=[ChatChoice(message=ChatMessageOut(content=text),
                                finish_reason=_finish(done))],
        )


class CompletionFormatter:
    """Legacy completion shapes (``text_completion``, same shape for chunks)."""

    def __init__(self, meta: Meta) -> None:
        self.m = meta
        self._delta = _DeltaTemplate(self._make(_MARK, None).model_dump_json())

    def reroute(self, fingerprint: str) -> None:
        """The job moved to another miner: later chunks name it."""
        self.m.fingerprint = fingerprint
        self._delta = _DeltaTemplate(self._make(_MARK, None).model_dump_json())

    def _make(self, text: str, finish: str | None, usage: Usage | None = None,
              choices: bool = True) -> Completion:
        return Completion(
            id=self.m.id, created=self.m.created, model=self.m.model,
            system_fingerprint=self.m.fingerprint, usage=usage,
            choices=[CompletionChoice(text=text, finish_reason=finish)] if choices else [],
        )

    def first(self) -> str | None:
        return None

    def delta(self, text: str) -> str:
        return self._delta.render(text)

    def last(self, done: Done) -> str:
        return self._make("", _finish(done)).model_dump_json()

    def usage(self, done: Done) -> str:
        return self._make("", None, _usage(done), choices=False).model_dump_json()

    def whole(self, text: str, done: Done) -> Completion:
        return self._make(text, _finish(done), _usage(done))


Formatter = ChatFormatter | CompletionFormatter


def sse(data: str) -> bytes:
    """One server-sent event carrying ``data``."""
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


async def unless_client_leaves(receive: Callable[[], Awaitable[dict[str, Any]]],
                               work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run ``work`` while watching the ASGI ``receive`` channel of its HTTP request:
    ``(True, result)``, or ``(False, None)`` once the client hung up first, after cancelling
    ``work`` (which cancels the job on the miner, or leaves the queue) instead of computing
    an answer nobody will read."""
    # ``work`` runs in the caller's task, and a watcher task cancels that task when the
    # client hangs up: one task per request instead of two and an asyncio.wait.
    current = asyncio.current_task()
    assert current is not None
    left = False

    async def disconnected() -> None:
        nonlocal left
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a channel that fails is a client gone
            pass
        left = True
        current.cancel()

    watcher = asyncio.ensure_future(disconnected())
    try:
        result = await work
    except asyncio.CancelledError:
        # Ours alone is swallowed; a cancellation from outside as well goes on.
        if not left or current.uncancel() > 0:
            raise
        return False, None
    finally:
        watcher.cancel()
    if left:  # cancelled, but ``work`` finished anyway: the client is gone all the same
        current.uncancel()
        return False, None
    return True, result
