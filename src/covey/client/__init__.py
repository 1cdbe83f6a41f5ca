"""Client side: a small streaming chat helper (the ``openai`` SDK works as well)."""

from covey.client.chat import ChatError, stream_chat

__all__ = ["ChatError", "stream_chat"]
