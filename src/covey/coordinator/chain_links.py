"""The links of a chain of shards, and rebuilding a link that failed elsewhere.

Each link keeps every input it was sent (:class:`ChainLink`), as Petals' client does, so a
link whose miner failed can be rebuilt on other miners holding its blocks: the recorded
inputs are replayed there from position 0 to refill the KV cache, and the step that failed
goes on from the new link (:class:`Rebuilding`, mixed into
:class:`~covey.coordinator.chain.ChainJob`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy, no_takeover
from covey.coordinator.job_faults import MinerFault
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerSession
from covey.coordinator.placement import ShardMiner, plan_chain
from covey.coordinator.scores import Scoreboard
from covey.coordinator.shards import join_chunks
from covey.protocol import Generate
from covey.protocol.receipts import Receipt
from covey.protocol.shard import CHAIN_START, Forward, Forwarded, Tensor

log = logging.getLogger("covey.coordinator.chain")


@dataclass
class ChainLink:
    """One link of the running chain: ``session`` runs blocks ``[start, end)``; ``sid`` is
    the chain session's id there and ``position`` the positions its cache holds.
    ``inputs`` is every input it was sent, to rebuild it elsewhere: the first link's
    prompt job and token ids, another link's hidden-state chunks."""

    session: MinerSession
    start: int
    end: int
    sid: str
    position: int = 0
    steps_run: int = 0
    """Steps it answered (its receipt's ``completion_tokens``)."""
    steps: int = 0
    seconds: float = 0.0
    """Decode steps it ran and their seconds, round trip (its measured speed)."""
    tokens: list[int] = field(default_factory=list)
    chunks: list[tuple[Tensor, bytes]] = field(default_factory=list)
    inputs: str = CHAIN_START
    outputs: str = CHAIN_START
    """The chains of the digests of what it was sent and sent back (its receipt's)."""
    receipt: tuple[Receipt, str] | None = None
    """Its latest signed receipt for the session."""


class Rebuilding:
    """Rebuilding a failed link of a :class:`~covey.coordinator.chain.ChainJob`."""

    job: Generate
    metrics: Metrics | None
    policy: FailoverPolicy
    scores: Scoreboard
    links: list[ChainLink]
    total: int
    failovers: int
    _tried: set[str]
    _ids: list[int]
    _chars: int
    _on_failover: Callable[[str], None] | None
    _candidates: Callable[[], list[ShardMiner]]
    _take: Callable[[str, int, int], ChainLink]
    _release: Callable[[ChainLink], None]
    _forward: Callable[..., Forward]

    async def _hop(self, link: ChainLink, task: Forward) -> Forwarded:
        raise NotImplementedError

    async def _rebuild(self, i: int, fault: MinerFault, position: int, final: bool
                       ) -> tuple[int, Forwarded]:
        """Replace link ``i`` (failed with ``fault`` during the step at ``position``):
        plan miners for its blocks, replay its recorded inputs there, and return the index
        of the last new link with its answer for this step.

        Raises:
            MinerFault: replacements spent, or no miner left holds those blocks.
        """
        while True:
            old = self.links[i]
            log.warning("chain %s: shard %s (blocks %d:%d) failed (%s); rebuilding it",
                        self.job.job_id, old.session.miner_id[:16], old.start, old.end,
                        fault.reason)
            if fault.blame:
                self.scores.failure(old.session.miner_id)
            self._tried.add(old.session.miner_id)
            self.failovers += 1
            if self._on_failover is not None:
                self._on_failover(fault.reason)
            if self.failovers >= self.policy.max_tries:
                raise fault
            plan = plan_chain(self._candidates(), self.total, frozenset(self._tried),
                              old.start, old.end)
            if plan is None:
                raise MinerFault(fault.reason, no_takeover(fault, ApiError(
                    503, f"no other miner holds blocks {old.start}:{old.end} of "
                    f"'{self.job.model}'", code="no_miner_available",
                    type="service_unavailable")))
            new = [self._take(link.miner_id, link.start, link.end) for link in plan.links]
            self._release(old)
            began = time.monotonic()
            try:
                reply = await self._replay(old, new, position, final)
            except MinerFault as again:
                for link in new:
                    self._release(link)
                fault = again
                continue
            self.links[i:i + 1] = new
            took = time.monotonic() - began
            log.info("chain %s: blocks %d:%d rebuilt on %s in %.3f s", self.job.job_id,
                     old.start, old.end, ", ".join(n.session.miner_id[:16] for n in new), took)
            if self.metrics is not None:
                self.metrics.shard_rebuild.observe(took)
            return i + len(new) - 1, reply

    async def _replay(self, old: ChainLink, new: list[ChainLink], position: int, final: bool
                      ) -> Forwarded:
        """Rebuild ``old``'s cache on the ``new`` links from its recorded inputs (this
        step's included); returns the last new link's answer for this step (positions
        from ``position``)."""
        first = old.start == 0
        chunks = list(old.chunks)
        tokens = list(old.tokens)
        reply: Forwarded | None = None
        for j, link in enumerate(new):
            end_of_new = j == len(new) - 1
            emit_from = position if end_of_new else 0
            link.tokens, link.chunks = tokens, chunks
            outputs: list[tuple[Tensor, bytes]] = []
            if first and j == 0:
                task = self._forward(link, 0, final, prompt=True, token_ids=tuple(tokens),
                                     emit_from=emit_from, resume=tuple(self._ids),
                                     resume_chars=self._chars)
                reply = await self._hop(link, task)
                link.position = reply.tokens
                if reply.hidden is not None:
                    outputs.append((reply.hidden, reply.data))
            else:
                runs = join_chunks(chunks)
                for k, (tensor, data) in enumerate(runs):
                    sample = k == len(runs) - 1
                    task = self._forward(link, link.position, final, hidden=tensor,
                                         data=data, emit_from=emit_from, sample=sample,
                                         resume=tuple(self._ids), resume_chars=self._chars)
                    reply = await self._hop(link, task)
                    link.position += reply.tokens
                    if reply.hidden is not None and reply.hidden.shape[1] > 0:
                        outputs.append((reply.hidden, reply.data))
            tokens, chunks = [], outputs
        assert reply is not None
        return reply
