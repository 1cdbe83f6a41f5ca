"""Miner backends: one class per runtime behind :class:`~covey.miner.backends.base.Backend`."""

from covey.miner.backends.base import Backend, BackendError

__all__ = ["Backend", "BackendError"]
