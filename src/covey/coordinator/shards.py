"""What live miners hold of sharded models: the registry's view the router, the chain and
``GET /v1/models`` share (which miner holds which blocks, what is missing)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerRegistry, MinerSession
from covey.coordinator.placement import missing_blocks
from covey.protocol import ModelOffer
from covey.protocol.shard import Tensor


@dataclass(frozen=True)
class ShardStatus:
    """How completely live miners hold a sharded model: ``total`` blocks, the live
    shards as (miner id, start, end), and the ``missing`` ranges (empty: complete)."""

    total: int
    shards: tuple[tuple[str, int, int], ...]
    missing: tuple[tuple[int, int], ...]

    @property
    def complete(self) -> bool:
        return not self.missing


def shard_sessions(registry: MinerRegistry, model: str) -> list[tuple[MinerSession, ModelOffer]]:
    """Live sessions holding a shard of ``model``, with their offers."""
    out = []
    for s in registry.sessions.values():
        if s.closed:
            continue
        offer = s.shard_offer(model)
        if offer is not None:
            out.append((s, offer))
    return out


def shard_status(registry: MinerRegistry, model: str) -> ShardStatus | None:
    """The model's :class:`ShardStatus`, or None when no live miner holds a shard of it."""
    shards = shard_sessions(registry, model)
    if not shards:
        return None
    total = max(o.shard.total for _, o in shards if o.shard is not None)
    ranges = [(o.shard.start, o.shard.end) for _, o in shards
              if o.shard is not None and o.shard.total == total]
    return ShardStatus(total, tuple(sorted((s.miner_id, o.shard.start, o.shard.end)
                                           for s, o in shards if o.shard is not None)),
                       tuple(missing_blocks(ranges, total)))


def join_chunks(chunks: Sequence[tuple[Tensor, bytes]]) -> list[tuple[Tensor, bytes]]:
    """Recorded hidden-state chunks joined into as few tensors as their dtypes allow
    (one per run of a dtype; batch 1, so the token axis concatenates as bytes)."""
    out: list[tuple[Tensor, bytes]] = []
    for tensor, data in chunks:
        if out and out[-1][0].dtype == tensor.dtype and out[-1][0].shape[2:] == tensor.shape[2:]:
            prev, prev_data = out[-1]
            shape = (1, prev.shape[1] + tensor.shape[1], *tensor.shape[2:])
            out[-1] = (Tensor(shape=shape, dtype=tensor.dtype), prev_data + data)
        else:
            out.append((tensor, data))
    return out


def incomplete(model: str, status: ShardStatus) -> ApiError:
    """The 503 for a request to ``model`` while ``status`` shows blocks missing (it names
    them and the command that would fill the first gap)."""
    gaps = ", ".join(f"{s}:{e}" for s, e in status.missing)
    return ApiError(503, f"'{model}' is incomplete: no live miner holds blocks {gaps} of "
                    f"its {status.total}. Start a miner with `covey miner --model "
                    f"{model} --blocks {status.missing[0][0]}:{status.missing[0][1]}`.",
                    code="no_miner_available", type="service_unavailable",
                    headers={"Retry-After": "5"})
