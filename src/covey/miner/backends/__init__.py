"""Miner backends: one class per runtime behind :class:`~covey.miner.backends.base.Backend`,
each declaring the task kinds it can do (its capabilities)."""

from covey.miner.backends.base import Backend, BackendError, EmbeddingBackend, TextBackend

__all__ = ["Backend", "BackendError", "EmbeddingBackend", "TextBackend"]
