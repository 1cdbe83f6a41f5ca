"""Running a generation on a chain of shard miners (a sharded model).

:class:`ChainJob` plans a chain (:func:`~covey.coordinator.placement.plan_chain`), sends
each step through it — the prompt first (prefill), then one token at a time (decode) —
relaying the hidden states each shard returns to the next one, and yields the same
``delta`` / ``done`` frames a single miner's job does, so :class:`~covey.coordinator.api.
serving.Serving` streams and bills it like any job.

A shard that fails (disconnects, stalls, errors, answers out of shape) is replaced without
the client noticing more than a pause: the coordinator keeps every input it sent to each
link of the chain, as Petals' client does, plans a replacement for the dead link's blocks
(one miner or several), replays those inputs to rebuild the KV cache there, and carries on
from the step that failed. Greedy answers come out the same as uninterrupted ones, and the
user is charged once: each shard of the chain that finished is paid its share of the
blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from covey.coordinator.chain_links import ChainLink, Rebuilding
from covey.coordinator.errors import ApiError
from covey.coordinator.failover import FailoverPolicy
from covey.coordinator.job_faults import MinerFault, miner_error, protocol
from covey.coordinator.link import MinerLink, TaskRefused
from covey.coordinator.metrics import Metrics
from covey.coordinator.miners import MinerRegistry, MinerSession
from covey.coordinator.outcome import Outcome, ShardAnswer, ShardLink, Share
from covey.coordinator.placement import Plan, ShardMiner, plan_chain
from covey.coordinator.scores import Scoreboard
from covey.coordinator.shards import incomplete, shard_sessions, shard_status
from covey.protocol import Delta, Done, Generate, Started
from covey.protocol.receipts import Receipt, verify_receipt
from covey.protocol.shard import (
    Forward,
    Forwarded,
    Tensor,
    chain_digest,
    tensor_digest,
)

log = logging.getLogger("covey.coordinator.chain")

_ids = itertools.count(1)
CHAIN_POLL_S = 0.05
"""How often a request waiting for a free chain looks again, in seconds."""
SECONDS_PER_POSITION = 0.02
"""Time a shard is allowed per position of a step, over the stall timeout: 20 ms, about 5
times what SmolLM2's 15 blocks take on one CPU thread here, so a long prompt is not
mistaken for a stalled shard."""
CLIENT_ERRORS = frozenset({"invalid_prompt", "context_length_exceeded"})
"""Codes a shard refuses a request with that are the request's fault (a 400 for the
client, nobody blamed); any other refusal is the shard's fault and it is replaced."""


class ChainJob(Rebuilding):
    """A generation on a chain of shards, with the interface Serving uses of a running job
    (``RunningJob``): start, frames, outcome, close.

    Raises (from :meth:`start` and :meth:`frames`): :class:`ApiError` — 503 when no chain
    covers the model (naming the missing blocks), 429 when every chain stayed busy for
    ``queue_timeout`` seconds, the first
    shard's 400 for a bad prompt, or a 502 once replacements are spent.
    """

    def __init__(self, job: Generate, registry: MinerRegistry, scores: Scoreboard,
                 account: str, policy: FailoverPolicy,
                 on_close: Callable[[ChainJob], Awaitable[object] | None] | None = None,
                 on_failover: Callable[[str], None] | None = None,
                 metrics: Metrics | None = None, queue_timeout: float = 120.0) -> None:
        self.job = job
        self.metrics = metrics
        self.queue_timeout = queue_timeout
        """Seconds a request may wait for a chain with free slots."""
        self.account = account
        self.policy = policy
        self.registry = registry
        self.scores = scores
        self.started: Started | None = None
        self.done: Done | None = None
        self.failed = False
        self.error: ApiError | None = None
        self.failovers = 0
        self.checkable = True
        """False when the client opted out of re-checks."""
        self.first_token_at: float | None = None
        self.settlement: Awaitable[object] | None = None
        self.total = 0
        self.links: list[ChainLink] = []
        self._on_close = on_close
        self._on_failover = on_failover
        self._tried: set[str] = set()
        self._ids: list[int] = []
        self._sampled: list[int] = []
        self._chars = 0
        self._sha256: str | None = None
        self._pending: Forwarded | None = None
        self._closed = False
        self._budget = 0
        self._receipts: tuple[tuple[Receipt, str], ...] = ()

    # -- the interface Serving uses ---------------------------------------------------

    @property
    def session(self) -> MinerSession | None:
        """The last shard's session (names the answer's ``system_fingerprint``)."""
        return self.links[-1].session if self.links else None

    @property
    def delivered(self) -> int:
        return len(self._ids)

    async def __aenter__(self) -> ChainJob:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close()
        if exc_type is None and self.settlement is not None:
            await asyncio.shield(self.settlement)

    async def start(self) -> None:
        """Plan a chain and run the prompt through it (the first token is then ready).

        Raises:
            ApiError: see the class docstring.
        """
        offers = [o for _, o in shard_sessions(self.registry, self.job.model)]
        status = shard_status(self.registry, self.job.model)
        if status is None:
            raise _gone(self.job.model)
        self.total = status.total
        self._sha256 = offers[0].sha256
        if not status.complete:
            raise incomplete(self.job.model, status)
        plan = await self._free_chain()
        self.links = [self._take(link.miner_id, link.start, link.end) for link in plan.links]
        try:
            first = await self._step(None, 0, final=False)
        except MinerFault as fault:  # only after replacements were spent
            self._fail(fault.error)
        prompt = self.links[0].position if self.links else 0
        self.started = Started(job_id=self.job.job_id, prompt_tokens=prompt)
        context = min(o.context_length for _, o in shard_sessions(self.registry,
                                                                      self.job.model))
        cap = self.job.params.max_tokens
        self._budget = max(1, min(cap or context, context - prompt))
        self._pending = first

    async def frames(self) -> AsyncIterator[Delta | Done]:
        """The answer's deltas, then ``done`` with usage for the whole answer."""
        reply = self._pending
        assert reply is not None and self.started is not None
        while True:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            ended = reply.finish_reason == "stop"
            if reply.token_id is not None:
                self._sampled.append(reply.token_id)
            ids = () if reply.end_of_text or reply.token_id is None else (reply.token_id,)
            self._ids.extend(ids)
            self._chars += len(reply.text)
            if ids or reply.text:
                yield Delta(job_id=self.job.job_id, text=reply.text, token_ids=ids)
            if ended or len(self._ids) >= self._budget:
                self._receipts = self.receipts()
                self.done = Done(job_id=self.job.job_id,
                                 finish_reason="stop" if ended else "length",
                                 prompt_tokens=self.started.prompt_tokens,
                                 completion_tokens=len(self._ids))
                for link in self.links:
                    rate = link.steps / link.seconds if link.seconds > 0 else None
                    self.scores.success(link.session.miner_id, None, rate)
                yield self.done
                return
            token = reply.token_id
            assert token is not None
            final = len(self._ids) + 1 >= self._budget
            try:
                reply = await self._step(token, self.links[0].position, final)
            except MinerFault as fault:
                self._fail(fault.error)

    def receipts(self) -> tuple[tuple[Receipt, str], ...]:
        """The links' latest receipts that are signed by their miner and true to the
        session (its id, the weights, the digest chains of what the coordinator sent and
        got, the positions and steps); a link without one counts against its miner."""
        good = []
        for link in self.links:
            r, signature = link.receipt or (None, None)
            if r is None or signature is None:
                problem = "no receipt"
            elif r.miner != link.session.miner_id or not verify_receipt(r, signature):
                problem = "a receipt not signed by this miner"
            elif (r.job_id, r.model_sha256, r.request_sha256, r.output_sha256,
                  r.prompt_tokens, r.completion_tokens) != (
                    link.sid, self._sha256, link.inputs, link.outputs, link.position,
                    link.steps_run):
                problem = "a receipt that does not match the session"
            else:
                good.append((r, signature))
                continue
            log.warning("chain %s: shard %s sent %s", self.job.job_id,
                        link.session.miner_id[:16], problem)
            self.scores.failure(link.session.miner_id)
        return tuple(good)

    def outcome(self, stream: bool) -> Outcome:
        """The chain's :class:`Outcome`: paid to the links of the chain that finished,
        each for its share of the blocks."""
        last = self.session
        shares = tuple(Share(link.session.miner_id, link.end - link.start)
                       for link in self.links)
        offer = last.shard_offer(self.job.model) if last else None
        base = Outcome(self.job.job_id, self.account, self.job.model, "failed",
                       last.miner_id if last else None, offer, failovers=self.failovers,
                       checkable=False, shares=shares)
        prompt = self.started.prompt_tokens if self.started else 0
        if self.done is not None:
            answer = ShardAnswer(self.job, self._sha256 or "", self.total, tuple(
                ShardLink(link.session.miner_id, link.start, link.end, tuple(link.tokens),
                          tuple(link.chunks)) for link in self.links), tuple(self._sampled))
            return Outcome(self.job.job_id, self.account, self.job.model, "done",
                           base.miner_id, offer, prompt_tokens=prompt,
                           completion_tokens=len(self._ids), failovers=self.failovers,
                           checkable=self.checkable, shares=shares, answer=answer,
                           shard_receipts=self._receipts)
        if self.failed or self.started is None or last is None:
            return base
        return Outcome(self.job.job_id, self.account, self.job.model, "client_closed",
                       base.miner_id, offer, prompt_tokens=prompt,
                       completion_tokens=len(self._ids) if stream else 0,
                       failovers=self.failovers, checkable=False, shares=shares)

    def close(self) -> None:
        """End the chain session on every shard, free their slots and settle. Idempotent
        and synchronous (it runs while a departed client's request is cancelled)."""
        if self._closed:
            return
        self._closed = True
        for link in self.links:
            self._release(link)
        if self._on_close is not None:
            self.settlement = self._on_close(self)

    # -- the chain --------------------------------------------------------------------

    async def _free_chain(self) -> Plan:
        """A chain with a free slot on every link, waiting up to ``queue_timeout`` seconds
        for one while they are all busy (polled: a chain frees up when an answer ends).

        Raises:
            ApiError: 503 when blocks lose their last miner meanwhile, 429 when no chain
                frees up in time.
        """
        deadline = time.monotonic() + self.queue_timeout
        while (plan := plan_chain(self._candidates(), self.total)) is None:
            status = shard_status(self.registry, self.job.model)
            if status is None or not status.complete:
                raise incomplete(self.job.model, status) if status else _gone(self.job.model)
            if time.monotonic() >= deadline:
                raise ApiError(429, f"Every chain serving '{self.job.model}' stayed busy for "
                               f"{self.queue_timeout:.0f} s; try again shortly.",
                               code="rate_limit_exceeded", type="rate_limit_error")
            await asyncio.sleep(CHAIN_POLL_S)
        return plan

    def _candidates(self) -> list[ShardMiner]:
        out = []
        for s, o in shard_sessions(self.registry, self.job.model):
            if o.shard is None or o.shard.total != self.total or o.sha256 != self._sha256:
                continue
            tps = self.scores.get(s.miner_id).decode_tps  # steps/s through its range
            per_block = 1.0 / (tps * o.shard.size) if tps else None
            out.append(ShardMiner(s.miner_id, o.shard.start, o.shard.end, per_block,
                                  s.busy.get(self.job.model, 0), s.slots_for(self.job.model)))
        return out

    def _take(self, miner_id: str, start: int, end: int) -> ChainLink:
        session = self.registry.sessions[miner_id]
        session.busy[self.job.model] = session.busy.get(self.job.model, 0) + 1
        session.active += 1
        return ChainLink(session, start, end, f"{self.job.job_id}.{next(_ids)}")

    def _release(self, link: ChainLink) -> None:
        session = link.session
        session.busy[self.job.model] = max(0, session.busy.get(self.job.model, 1) - 1)
        session.active = max(0, session.active - 1)
        session.completed += 1
        MinerLink(session).end_session(link.sid)

    def _fail(self, error: ApiError) -> None:
        self.failed = True
        self.error = error
        raise error

    async def _step(self, token: int | None, position: int, final: bool) -> Forwarded:
        """Run one step through every link: the prompt (``token`` None) or ``token`` at
        ``position``; returns the last shard's answer. A link that fails is rebuilt
        elsewhere and the step goes on from it.

        Raises:
            ApiError: a shard's 400 for the request itself.
            MinerFault: a link failed and could not be replaced.
        """
        i = 0
        carry: Forwarded | None = None
        while i < len(self.links):
            link = self.links[i]
            if i == 0:
                if token is None:
                    task = self._forward(link, position=0, final=final, prompt=True)
                else:
                    link.tokens.append(token)
                    task = self._forward(link, position, final, token_ids=(token,))
            else:
                assert carry is not None and carry.hidden is not None
                link.chunks.append((carry.hidden, carry.data))
                task = self._forward(link, position, final, hidden=carry.hidden,
                                     data=carry.data)
            try:
                began = time.monotonic()
                carry = await self._hop(link, task)
                took = time.monotonic() - began
                link.position += carry.tokens
                if self.metrics is not None:
                    self.metrics.shard_relay.observe(max(0.0, took - carry.compute_ms / 1000))
                if token is not None:
                    link.steps += 1
                    link.seconds += took
            except MinerFault as fault:
                i, carry = await self._rebuild(i, fault, position, final)
            i += 1
        assert carry is not None
        return carry

    def _timeout(self, task: Forward) -> float:
        """Seconds a shard may take over ``task``: the stall timeout, plus
        :data:`SECONDS_PER_POSITION` for each position of a long step (a prompt or a
        replay: a CPU shard prefills a few hundred positions a second)."""
        positions = (task.hidden.shape[1] if task.hidden is not None
                     else len(task.token_ids) + (1000 if task.messages or task.prompt else 0))
        return self.policy.stall_timeout + SECONDS_PER_POSITION * positions

    def _forward(self, link: ChainLink, position: int, final: bool, *, prompt: bool = False,
                 token_ids: tuple[int, ...] = (), hidden: Tensor | None = None,
                 data: bytes = b"", emit_from: int | None = None, sample: bool = True,
                 resume: tuple[int, ...] = (), resume_chars: int = 0) -> Forward:
        from covey.protocol.wire import ShardRange

        job = self.job
        return Forward(job_id=f"{link.sid}.{next(_ids)}", session=link.sid, model=job.model,
                       model_sha256=self._sha256,
                       blocks=ShardRange(start=link.start, end=link.end, total=self.total),
                       position=position,
                       messages=job.messages if prompt else None,
                       prompt=job.prompt if prompt else None, token_ids=token_ids,
                       hidden=hidden, data=data, emit_from=emit_from, params=job.params,
                       stop_ids=job.stop_ids, final=final, sample=sample, resume=resume,
                       resume_chars=resume_chars)

    async def _hop(self, link: ChainLink, task: Forward) -> Forwarded:
        """One shard's answer to ``task``, checked for shape.

        Raises:
            MinerFault: the shard failed or answered out of shape.
            ApiError: the request's own fault (a 400 for the client).
        """
        try:
            async with MinerLink(link.session).call(task, self._timeout(task)) as call:
                reply = await call.next()
        except TaskRefused as refused:
            error = miner_error(refused.frame)
            if refused.frame.code in CLIENT_ERRORS:
                raise error from None
            raise MinerFault("miner_error", error) from None
        assert isinstance(reply, Forwarded)
        if reply.input_sha256 != tensor_digest(task) or \
                reply.output_sha256 != tensor_digest(reply):
            raise protocol("a step's digests that do not match what it got and sent")
        link.steps_run += 1
        link.inputs = chain_digest(link.inputs, reply.input_sha256)
        link.outputs = chain_digest(link.outputs, reply.output_sha256)
        if reply.receipt is not None and reply.signature is not None:
            link.receipt = (reply.receipt, reply.signature)
        token = link.end == self.total and task.sample
        if token != (reply.token_id is not None):
            raise protocol("a shard answered with the other end's output")
        if not token:
            h = reply.hidden
            assert h is not None
            if len(h.shape) != 3 or h.shape[0] != 1:
                raise protocol(f"hidden states of shape {h.shape}")
        return reply


def _gone(model: str) -> ApiError:
    return ApiError(503, f"No miner is serving '{model}' right now; try again later.",
                    code="no_miner_available", type="service_unavailable",
                    headers={"Retry-After": "5"})


async def start_chain(job: Generate, registry: MinerRegistry, scores: Scoreboard, account: str,
                      policy: FailoverPolicy,
                      on_close: Callable[[ChainJob], Awaitable[object] | None] | None = None,
                      on_failover: Callable[[str], None] | None = None,
                      metrics: Metrics | None = None, queue_timeout: float = 120.0
                      ) -> ChainJob:
    """Plan a chain for ``job`` (a sharded model's) and run its prompt through it.
    ``on_close`` is called once when the job ends, however it ends.

    Raises:
        ApiError: see :class:`ChainJob`.
    """
    running = ChainJob(job, registry, scores, account, policy, on_close, on_failover, metrics,
                       queue_timeout)
    try:
        await running.start()
    except BaseException:
        running.close()
        raise
    return running
