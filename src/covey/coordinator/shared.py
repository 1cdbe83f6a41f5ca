"""What replicas share besides their miners: per-key limits, reputation and slots.

Each replica publishes a report on ``covey.usage`` every ``interval`` seconds (0.2 by
default), and reads the others':

- **Per-key limits.** The requests of each account it has open (those whose count changed,
  and every one each ``full_every`` reports) and the requests it started since its last
  report. Another replica counts the open ones against the key's concurrency and takes the
  started ones out of its own token bucket (:class:`~covey.coordinator.quotas.KeyLimits`).
- **Reputation.** Every change its scoreboard made (a job's success, a failure, a trial's
  lift), which the others apply to theirs (:meth:`~covey.coordinator.scores.Scoreboard.
  apply`). A replica that starts takes a running replica's scoreboard first
  (``covey.scores``, request and reply).
- **Slots.** The slots its jobs hold on each miner, local or another replica's
  (``MinerSession.elsewhere`` on the others), so a miner is not given more tasks than it
  has slots network-wide, and a slot freed by one replica's job goes to a request waiting
  on another.

Why NATS pub/sub and no store: like the registry (:mod:`covey.coordinator.remote`), this is
soft state about live requests and live sockets; a replica that dies must take its counts
with it (dropped after ``stale_after`` seconds of silence), and no request pays a round
trip to a store. The price is lag: limits and slots hold across replicas up to what the
others admit in one interval (``tests/test_shared.py`` measures it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from covey.coordinator.miners import MinerRegistry
from covey.coordinator.quotas import KeyLimits
from covey.coordinator.remote import STALE_S, ReplicaBus
from covey.coordinator.router import Dispatcher
from covey.coordinator.scores import Scoreboard

log = logging.getLogger("covey.coordinator.shared")

REPORT_S = 0.2
"""Seconds between a replica's usage reports."""
FULL_EVERY = 10
"""Every this many reports carries every open count, not only those that changed (a lost
message heals within ``FULL_EVERY × REPORT_S`` seconds)."""


SNAPSHOT_RECORDS = 5000
"""Miner records a replica hands one that starts (about 120 bytes each: well within NATS's
default 1 MiB message)."""
COUNT_MAX = 1_000_000
"""The largest count a report may carry (requests open or started, slots held)."""
_Name = Annotated[str, Field(min_length=1, max_length=128)]
_Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]


class Report(BaseModel):
    """One replica's usage report (see the module docstring): ``open`` and ``started``
    requests by account, ``scores`` events (:meth:`~covey.coordinator.scores.Scoreboard.
    checked` holds each to its shape), ``busy`` slots by miner and model; ``full`` says
    ``open`` and ``busy`` list everything, not only what changed."""

    model_config = ConfigDict(strict=True, frozen=True)

    replica: _Name
    full: bool = False
    open: dict[_Name, _Count] = {}
    started: dict[_Name, _Count] = {}
    scores: list[Any] = Field(default=[], max_length=COUNT_MAX)
    busy: dict[_Name, dict[_Name, _Count]] = {}


class SharedUsage:
    """This replica's reports to the others, and what it learns from theirs (see the
    module docstring). ``bus``: the replicas' bus, started; ``limits`` and ``dispatcher``
    (its registry and scoreboard): this replica's own."""

    def __init__(self, bus: ReplicaBus, limits: KeyLimits, dispatcher: Dispatcher,
                 interval: float = REPORT_S, stale_after: float = STALE_S) -> None:
        self.bus = bus
        self.limits = limits
        self.dispatcher = dispatcher
        self.interval = interval
        self.stale_after = stale_after
        self._events: list[tuple[Any, ...]] = []
        self._sent_busy: dict[str, dict[str, int]] = {}
        self._seen: dict[str, float] = {}  # replica → when its last report came
        self._open: dict[str, dict[str, int]] = {}  # replica → account → open requests
        self._busy: dict[str, dict[str, dict[str, int]]] = {}  # replica → miner → model → n
        self._task: asyncio.Task[None] | None = None
        self._reports = 0

    @property
    def registry(self) -> MinerRegistry:
        return self.dispatcher.registry

    @property
    def scores(self) -> Scoreboard:
        return self.dispatcher.scores

    async def start(self, timeout: float = 1.0) -> None:
        """Take a running replica's scoreboard (waiting up to ``timeout`` s for one), then
        start reporting and listening."""
        # Asked before this replica answers it itself: alone, NATS says at once that
        # nobody listens.
        answer = await self.bus.ask("covey.scores", self.bus.replica.encode(), timeout)
        if answer is not None:
            try:
                self.scores.restore(json.loads(answer))
            except ValueError as exc:
                log.warning("another replica's scoreboard did not read: %s", exc)
        await self.bus.subscribe("covey.usage", self._on_report)
        await self.bus.subscribe("covey.scores", self._on_scores_asked)
        self.limits.shared = True
        self.scores.listener = self._changed
        self._task = asyncio.create_task(self._reporter())

    def _changed(self, event: tuple[Any, ...]) -> None:
        self._events.append(event)

    def close(self) -> None:
        """Stop reporting, with a last report that holds nothing open (queued on the bus:
        close the bus after this, which sends what is queued)."""
        if self._task is not None:
            self._task.cancel()
        self.scores.listener = None
        self.limits.shared = False
        self.bus.publish("covey.usage", Report(replica=self.bus.replica, full=True,
                                               scores=self._events).model_dump_json().encode(),
                         {})
        self._events = []

    async def _reporter(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.bus.publish("covey.usage", self.report(), {})
                self._expire()
            except Exception:  # noqa: BLE001 - one bad round must not end the reports
                log.exception("the usage report failed")

    def report(self) -> bytes:
        """This replica's next report (JSON), and forget what it carries."""
        self._reports += 1
        full = (self._reports - 1) % FULL_EVERY == 0  # the first too: a restart starts over
        opened, started = self.limits.report(full)
        events, self._events = self._events, []
        return Report(replica=self.bus.replica, full=full, open=opened, started=started,
                      scores=events, busy=self._busy_changes(full)).model_dump_json().encode()

    def _busy_changes(self, full: bool) -> dict[str, dict[str, int]]:
        now: dict[str, dict[str, int]] = {}
        for s in self.registry.sessions.values():
            held = {m: n for m, n in s.busy.items() if n > 0}
            if held:
                now[s.miner_id] = held
        if full:
            self._sent_busy = now
            return now
        changes: dict[str, dict[str, int]] = {}
        for miner in now.keys() | self._sent_busy.keys():
            before, after = self._sent_busy.get(miner, {}), now.get(miner, {})
            if before != after:
                changes[miner] = {m: after.get(m, 0) for m in before.keys() | after.keys()}
        self._sent_busy = now
        return changes

    # --- the others' reports -------------------------------------------------------------

    async def _on_report(self, msg: Any) -> None:
        try:
            self.take(msg.data)
        except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError, and any other
            log.warning("a malformed usage report came over the bus: %s",
                        str(exc).splitlines()[0])

    def take(self, data: bytes) -> None:
        """Apply another replica's report (:meth:`report`'s JSON); one of this replica's
        own is ignored.

        Raises:
            ValueError: a report of no known shape, or with a count or score out of range:
                nothing of it is applied.
        """
        report = Report.model_validate_json(data)
        if report.replica == self.bus.replica:
            return
        events = [Scoreboard.checked(e) for e in report.scores]
        replica = report.replica
        self._seen[replica] = time.monotonic()
        opened = self._open.setdefault(replica, {})
        touched = set(report.open)
        if report.full:  # what it no longer lists is closed
            touched |= opened.keys()
        for account in touched:
            n = report.open.get(account, 0)
            if n:
                opened[account] = n
            else:
                opened.pop(account, None)
            self._recount_open(account)
        for account, n in report.started.items():
            self.limits.spent(account, n)
        for event in events:
            self.scores.apply(event)
        busy = self._busy.setdefault(replica, {})
        changed = set(busy) if report.full else set()
        if report.full:
            busy.clear()
        for miner, models in report.busy.items():
            busy[miner] = {m: n for m, n in models.items() if n > 0}
            changed.add(miner)
        self._recount_busy(changed)

    def _recount_open(self, account: str) -> None:
        total = sum(o.get(account, 0) for o in self._open.values())
        if total:
            self.limits.elsewhere[account] = total
        else:
            self.limits.elsewhere.pop(account, None)

    def _recount_busy(self, miners: set[str]) -> None:
        for miner in miners:
            session = self.registry.sessions.get(miner)
            if session is None:
                continue
            counts: dict[str, int] = {}
            for per_replica in self._busy.values():
                for model, n in per_replica.get(miner, {}).items():
                    counts[model] = counts.get(model, 0) + n
            session.elsewhere = counts
        if miners:
            self.dispatcher.refresh()

    def _expire(self) -> None:
        now = time.monotonic()
        for replica in [r for r, at in self._seen.items() if now - at > self.stale_after]:
            log.warning("replica %s went silent; its requests and slots no longer count",
                        replica)
            del self._seen[replica]
            accounts = self._open.pop(replica, {})
            for account in accounts:
                self._recount_open(account)
            self._recount_busy(set(self._busy.pop(replica, {})))

    async def _on_scores_asked(self, msg: Any) -> None:
        if not msg.reply:
            return
        # Live miners' records first, and few enough for one NATS message (1 MiB).
        await msg.respond(json.dumps(self.scores.snapshot(
            list(self.registry.sessions), SNAPSHOT_RECORDS)).encode())
