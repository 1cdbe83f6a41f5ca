"""Streaming a chat answer from a coordinator's OpenAI-compatible API with httpx."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx


class ChatError(Exception):
    """The coordinator answered with an OpenAI-style error (``message``; ``code`` may be None)."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


def _error_of(payload: object, status: int | None) -> ChatError:
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        return ChatError(str(err.get("message")), err.get("code"), status)
    return ChatError(f"unexpected answer: {payload!r}"[:300], None, status)


def stream_chat(base_url: str, model: str, messages: list[dict[str, str]], *,
                api_key: str | None = None, max_tokens: int | None = None,
                temperature: float | None = None, timeout: float = 300.0) -> Iterator[str]:
    """Yield the answer's text pieces as they arrive.

    ``base_url`` is the coordinator's root (``http://127.0.0.1:8000``).

    Raises:
        ChatError: an error response, or an error event inside the stream.
        httpx.HTTPError: the coordinator cannot be reached.
    """
    body: dict[str, object] = {"model": model, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
        if resp.status_code != 200:
            resp.read()
            try:
                payload = resp.json()
            except ValueError:
                payload = resp.text
            raise _error_of(payload, resp.status_code)
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise _error_of(chunk, None)
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    yield text
