"""Closing gaps in sharded models: when live miners leave blocks of a model unheld, ask a
redundant shard miner that allows it (``rebalance`` in its offer) to load them instead
(:func:`~covey.coordinator.placement.rebalance` decides; Petals' servers move the same way).

The move costs the miner a reload and a reconnect; chains running on its old range rebuild
on the other miners holding it. A miner asked is not asked again for :data:`RETRY_S`
seconds, so a miner that cannot move is not asked in a loop.
"""

from __future__ import annotations

import logging
import time

from covey.coordinator.link import MinerLink
from covey.coordinator.miners import MinerRegistry
from covey.coordinator.placement import ShardMiner, rebalance
from covey.coordinator.shards import shard_sessions, shard_status

log = logging.getLogger("covey.coordinator.rebalance")

RETRY_S = 60.0
"""Seconds before a miner asked to move may be asked again."""


class Rebalancer:
    """Watches the registry (:meth:`changed` is an ``on_change`` callback) and asks shard
    miners to move into gaps."""

    def __init__(self, registry: MinerRegistry) -> None:
        self.registry = registry
        self._asked: dict[str, float] = {}
        self.moves = 0
        """Moves asked so far."""

    def changed(self) -> None:
        """Look at every sharded model; for one with a gap, ask one miner to move."""
        models = {o.name for s in self.registry.sessions.values() if not s.closed
                  for o in s.hello.models if o.shard is not None}
        now = time.monotonic()
        for model in sorted(models):
            status = shard_status(self.registry, model)
            if status is None or status.complete:
                continue
            sessions = {s.miner_id: (s, o) for s, o in shard_sessions(self.registry, model)
                        if o.shard is not None and o.shard.total == status.total}
            miners = [ShardMiner(i, o.shard.start, o.shard.end) for i, (_, o) in
                      sessions.items() if o.shard is not None]
            movable = frozenset(i for i, (s, o) in sessions.items() if o.rebalance
                                and s.welcomed.is_set()
                                and now - self._asked.get(i, -RETRY_S) >= RETRY_S)
            move = rebalance(miners, status.total, movable)
            if move is None:
                continue
            miner_id, (start, end) = move
            self._asked[miner_id] = now
            self.moves += 1
            log.warning("%s is missing blocks %s; asking miner %s to load %d:%d", model,
                        ", ".join(f"{a}:{b}" for a, b in status.missing), miner_id[:16],
                        start, end)
            MinerLink(sessions[miner_id][0]).reshard(model, start, end)
