"""Replicas share per-key limits, reputation and slots over NATS (coordinator/shared.py):
in-process replicas on the real NATS server, then two real replicas and a real miner."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, Proc, postgres_database
from covey.coordinator.errors import ApiError
from covey.coordinator.miners import MinerRegistry
from covey.coordinator.quotas import KeyLimitPolicy, KeyLimits
from covey.coordinator.remote import RemoteSession, ReplicaBus
from covey.coordinator.router import Dispatcher, QueuePolicy
from covey.coordinator.shared import SharedUsage
from test_billing import sign_up
from test_replicas import nats_url, replicas  # noqa: F401 - the fixture, and two replicas
from test_router import _session

INTERVAL = 0.05


class Replica:
    """One replica's shared state, in this process: its own registry, dispatcher, limits
    and bus."""

    def __init__(self, url: str, policy: KeyLimitPolicy, stale_after: float = 5.0) -> None:
        self.registry = MinerRegistry()
        self.dispatcher = Dispatcher(self.registry, QueuePolicy(timeout=5))
        self.limits = KeyLimits(policy)
        self.bus = ReplicaBus(self.registry, secrets.token_hex(6), url)
        self.shared = SharedUsage(self.bus, self.limits, self.dispatcher, INTERVAL,
                                  stale_after)

    async def start(self) -> Replica:
        await self.bus.start()
        await self.shared.start(timeout=0.5)
        return self

    async def close(self) -> None:
        if self.bus._nc is not None and not self.bus._nc.is_closed:
            self.shared.close()
            await self.bus.close()


@contextlib.asynccontextmanager
async def running(url: str, policy: KeyLimitPolicy, stale_after: float = 5.0
                  ) -> AsyncIterator[list[Replica]]:
    """Two replicas, started; more appended to the list are closed at the end too."""
    replicas = [await Replica(url, policy, stale_after).start() for _ in range(2)]
    try:
        yield replicas
    finally:
        for r in replicas:
            await r.close()


async def settle() -> None:
    """Long enough for every replica to have sent a report and read the others'."""
    await asyncio.sleep(INTERVAL * 6)


def refused(limits: KeyLimits, account: str) -> str | None:
    try:
        limits.enter(account)
    except ApiError as exc:
        assert exc.status == 429 and exc.code == "rate_limit_exceeded"
        return exc.message
    return None


def test_a_keys_limits_hold_across_replicas(nats_url):  # noqa: F811
    async def scenario() -> None:
        policy = KeyLimitPolicy(concurrency=3, per_minute=0)
        async with running(nats_url, policy) as (a, b):
            a.limits.enter("acct")
            a.limits.enter("acct")
            await settle()
            assert b.limits.elsewhere == {"acct": 2}
            assert refused(b.limits, "acct") is None  # the third, network-wide
            assert "already has 3 requests running" in refused(b.limits, "acct")
            assert refused(b.limits, "other") is None  # another key is not held back
            await settle()
            assert "already has 3" in refused(a.limits, "acct")
            a.limits.leave("acct")
            await settle()
            assert refused(b.limits, "acct") is None
            for _ in range(2):
                b.limits.leave("acct")
            a.limits.leave("acct")
            await settle()
            assert a.limits.elsewhere == {"other": 1} and b.limits.elsewhere == {}
            # A replica that stops says so: its requests stop counting at once.
            await b.close()
            await asyncio.sleep(INTERVAL)
            assert a.limits.elsewhere == {}

    asyncio.run(scenario())


def test_requests_per_minute_are_counted_across_replicas(nats_url):  # noqa: F811
    async def scenario() -> None:
        policy = KeyLimitPolicy(concurrency=0, per_minute=4)
        async with running(nats_url, policy) as (a, b):
            for _ in range(3):
                assert refused(a.limits, "acct") is None
            await settle()
            assert refused(b.limits, "acct") is None  # the fourth of the minute
            assert "limited to 4 requests per minute" in refused(b.limits, "acct")
            await settle()
            assert "limited to 4" in refused(a.limits, "acct")

    asyncio.run(scenario())


def test_reputation_is_shared_and_a_new_replica_starts_from_it(nats_url):  # noqa: F811
    async def scenario() -> None:
        policy = KeyLimitPolicy()
        async with running(nats_url, policy) as replicas:
            a, b = replicas
            miner = "m" * 64
            a.dispatcher.scores.failure(miner)
            a.dispatcher.scores.failure(miner)
            b.dispatcher.scores.success(miner, 0.5, 20.0)
            await settle()
            for r in (a, b):
                s = r.dispatcher.scores.get(miner)
                assert (s.failed, s.succeeded) == (2, 1)
                assert s.reputation == pytest.approx(0.8 * 0.8 * 1.01)
                assert (s.ttft, s.decode_tps) == (0.5, 20.0)
            a.dispatcher.scores.lift(miner, 0.9)
            await settle()
            assert b.dispatcher.scores.get(miner).reputation == pytest.approx(0.9)
            replicas.append(c := await Replica(nats_url, policy).start())
            s = c.dispatcher.scores.get(miner)
            assert (s.reputation, s.failed, s.succeeded) == (pytest.approx(0.9), 2, 1)

    asyncio.run(scenario())


def test_slots_are_counted_on_every_replica_and_a_freed_one_reaches_a_waiter(nats_url):  # noqa: F811
    async def scenario() -> None:
        policy = KeyLimitPolicy()
        async with running(nats_url, policy, stale_after=1.0) as (a, b):
            # One miner with two slots: connected to A, mirrored on B.
            here = _session(a.registry, "x", slots=2)
            there = _session(b.registry, "x", slots=2, kind=RemoteSession)
            assert await a.dispatcher.acquire("m", "u") is here
            assert await a.dispatcher.acquire("m", "u") is here
            await settle()
            assert there.elsewhere == {"m": 2} and not there.free_for("m")
            waiting = asyncio.ensure_future(b.dispatcher.acquire("m", "v"))
            await settle()
            assert not waiting.done() and b.dispatcher.waiting("m") == 1
            a.dispatcher.release(here, "u", "m")
            await settle()
            assert await asyncio.wait_for(waiting, 1) is there  # freed on A, granted on B
            await settle()
            assert here.elsewhere == {"m": 1} and not here.free_for("m")
            # A replica that goes silent (killed: no last report) no longer holds slots.
            assert b.shared._task is not None
            b.shared._task.cancel()
            await asyncio.sleep(0.5)
            assert here.elsewhere == {"m": 1}  # not yet stale
            await asyncio.sleep(1.0)
            assert here.elsewhere == {} and here.free_for("m")

    asyncio.run(scenario())


def test_a_malformed_report_changes_nothing_and_reports_go_on(nats_url):  # noqa: F811
    async def scenario() -> None:
        import nats

        policy = KeyLimitPolicy(concurrency=2, per_minute=0)
        a = await Replica(nats_url, policy).start()
        nc = await nats.connect(nats_url)
        try:
            for bad in (b"not json", b"[]", b"null", b"{}", json.dumps({"replica": 5}).encode(),
                        json.dumps({"replica": "z", "open": {"acct": "many"}}).encode(),
                        json.dumps({"replica": "z", "open": {"acct": -100}}).encode(),
                        json.dumps({"replica": "z", "open": {"acct": 10**18}}).encode(),
                        json.dumps({"replica": "z", "started": {"acct": 1.5}}).encode(),
                        json.dumps({"replica": "z", "busy": {"q": {"m": -1}}}).encode(),
                        b'{"replica": "z", "open": {"acct": 1}, "scores": '
                        b'[["lift", "q", Infinity]]}',
                        json.dumps({"replica": "y", "open": {"acct": 1}, "scores": [
                            ["ok", "q", 1.0, 2.0], ["ok", "q", 1.7e308, 1.7e308]]}).encode(),
                        b"[" * 100_000):
                await nc.publish("covey.usage", bad)
            await nc.flush()
            await settle()
            # Nothing of any of them was applied, not even a report's good part.
            assert a.limits.elsewhere == {}
            assert a.dispatcher.scores.snapshot() == {}
            assert a.shared._seen == {}
            a.limits.enter("acct")
            assert a.shared._task is not None and not a.shared._task.done()
        finally:
            await nc.close()
            await a.close()

    asyncio.run(scenario())


def test_two_real_replicas_hold_one_keys_concurrency(tmp_path: Path, nats_url):  # noqa: F811
    """A key allowed one request at a time, streaming through one replica, is refused by
    the other; once the stream ended, the other serves it."""
    with postgres_database() as db:
        one, two = replicas(tmp_path, "--database-url", db, "--nats-url", nats_url,
                            "--key-concurrency", "1")
        try:
            one.miners.append(Proc(["miner", "--data-dir", str(tmp_path / "miner"),
                                    "--threads", "1", "--ctx", "1024", "--coordinator",
                                    one.url], tmp_path / "miner.log"))
            one.wait_miners(1)
            two.wait_miners(1, timeout=15)
            headers = sign_up(one)
            body = {"model": MODEL, "max_tokens": 12,
                    "messages": [{"role": "user", "content": "Name a colour."}]}
            streamed = threading.Event()
            ended = threading.Event()

            def stream() -> None:
                with httpx.stream("POST", f"{one.url}/v1/chat/completions", headers=headers,
                                  json={**body, "max_tokens": 400, "stream": True,
                                        "temperature": 1.0, "seed": 3, "messages": [
                                            {"role": "user", "content":
                                             "Tell me a long story about a dragon."}]},
                                  timeout=120) as s:
                    for line in s.iter_lines():
                        if line.startswith("data: "):
                            streamed.set()
                ended.set()

            worker = threading.Thread(target=stream)
            worker.start()
            assert streamed.wait(60)
            time.sleep(0.6)  # two reports' time
            r = httpx.post(f"{two.url}/v1/chat/completions", headers=headers, json=body,
                           timeout=60)
            assert r.status_code == 429, r.text  # at once: not queued behind the story
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            assert "already has 1 requests running" in r.json()["error"]["message"]
            worker.join(120)
            assert ended.is_set()
            time.sleep(0.6)
            r = httpx.post(f"{two.url}/v1/chat/completions", headers=headers, json=body,
                           timeout=60)
            assert r.status_code == 200, r.text
        finally:
            for net in (one, two):
                net.close()


def test_score_events_and_records_from_elsewhere_are_held_to_their_shape():
    from covey.coordinator.scores import REPUTATION_MAX, Scoreboard

    board = Scoreboard()
    for bad in (["ok", "m"], ["ok", 5, None, None], ["ok", "m", "fast", None],
                ["ok", "m", float("nan"), None], ["ok", "m", 1.7e308, None],
                ["ok", "m", None, -1.0], ["ok", "", None, None], ["ok", "m" * 129, 1, 1],
                ["fail"], ["lift", "m", "high"], ["lift", "m", float("inf")],
                ["lift", "m", 11.0], ["lift", "m", 0.01], ["lift", "m", True], ["boom", "m"],
                "fail", None, {"ok": "m"}):
        with pytest.raises(ValueError):
            Scoreboard.checked(bad)
    board.apply(Scoreboard.checked(["ok", "m", 0.5, 40]))
    assert (board.get("m").ttft, board.get("m").decode_tps) == (0.5, 40.0)
    with pytest.raises(ValueError, match="1 of 3"):  # the good ones are taken
        board.restore({"a": [9.5, 12.5, 0.2, 3, 1], "b": [1.0, None],
                       "c": [2.0, None, None, 1, 0]})
    assert board.get("a").reputation == 9.5
    assert (board.get("a").decode_tps, board.get("a").succeeded) == (12.5, 3)
    assert board.get("c").reputation == 2.0
    for bad in ([float("nan"), None, None, 0, 0], [1.0, float("inf"), None, 0, 0],
                [REPUTATION_MAX * 2, None, None, 0, 0],
                [1.0, None, None, -1, 0], [1.0, None, None, 1.5, 0]):
        with pytest.raises(ValueError):
            board.restore({"d": bad})
    assert "d" not in board.snapshot()
    board.failure("b")
    board.restore({"b": [9.0, None, None, 0, 0]})  # measured here: kept
    assert board.get("b").reputation == pytest.approx(0.8)
    assert list(board.snapshot(["c", "gone"], limit=2)) == ["c", "m"]


def test_another_replicas_starts_drain_the_bucket_down_to_a_minutes_debt():
    now = [0.0]
    limits = KeyLimits(KeyLimitPolicy(concurrency=0, per_minute=60), clock=lambda: now[0])
    limits.spent("acct", 1_000)
    assert "limited to 60" in refused(limits, "acct")
    now[0] += 60.0  # a minute's refill pays the debt back, no more
    assert "limited to 60" in refused(limits, "acct")
    now[0] += 1.0
    assert refused(limits, "acct") is None
    limits.shared = True
    limits.enter("b")
    limits.leave("b")
    limits.enter("c")
    # What was admitted before sharing began is in the next full report, not in this one.
    assert limits.report() == ({"b": 0, "c": 1}, {"b": 1, "c": 1})
    assert limits.report() == ({}, {})
    assert limits.report(full=True) == ({"acct": 1, "c": 1}, {})


def test_a_nats_urls_credentials_are_never_shown():
    from covey.coordinator.remote import shown

    assert shown("nats://covey:s3cret@10.0.0.5:4222") == "nats://***@10.0.0.5:4222"
    assert shown("nats://t0ken@nats") == "nats://***@nats"
    assert shown("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
