"""Routing decisions as a pure function."""

import pytest

from covey.coordinator.router import Candidate, choose_miner


def test_least_loaded_wins():
    c = [
        Candidate(active=1, slots=2, last_dispatch=0),
        Candidate(active=0, slots=2, last_dispatch=5),
    ]
    assert choose_miner(c) == 1


def test_full_miners_are_skipped_and_all_full_gives_none():
    assert choose_miner([Candidate(1, 1, 0), Candidate(0, 1, 9)]) == 1
    assert choose_miner([Candidate(1, 1, 0), Candidate(2, 2, 0)]) is None
    assert choose_miner([]) is None


def test_ties_go_to_the_miner_idle_longest():
    c = [Candidate(0, 1, last_dispatch=10.0), Candidate(0, 1, last_dispatch=3.0)]
    assert choose_miner(c) == 1


def test_load_is_relative_to_slots():
    # 1 of 4 slots busy is lighter than 1 of 2
    assert choose_miner([Candidate(1, 2, 0), Candidate(1, 4, 1)]) == 1


def test_at_equal_load_the_cheaper_miner_wins():
    c = [Candidate(0, 1, 0.0, price=(500, 100)), Candidate(0, 1, 9.0, price=(200, 100))]
    assert choose_miner(c) == 1
    # ...but load comes first: a cheap busy miner loses to an idle dear one.
    c = [Candidate(0, 2, 0.0, price=(500, 100)), Candidate(1, 2, 0.0, price=(200, 100))]
    assert choose_miner(c) == 0


def test_reputation_then_price_then_speed_decide_among_equally_loaded_miners():
    flaky = Candidate(0, 1, 0.0, reputation=0.8)
    steady = Candidate(0, 1, 9.0, reputation=1.0)
    assert choose_miner([flaky, steady]) == 1
    # Reputations on the same 25% step count as equal; then price decides.
    cheap = Candidate(0, 1, 9.0, price=(100, 100), reputation=1.2)
    dear = Candidate(0, 1, 0.0, price=(200, 100), reputation=1.0)
    assert choose_miner([dear, cheap]) == 1
    # Same price: the faster miner; an unmeasured one is tried first.
    slow = Candidate(0, 1, 0.0, expected_s=4.0)
    fast = Candidate(0, 1, 9.0, expected_s=1.0)
    new = Candidate(0, 1, 9.5)
    assert choose_miner([slow, fast]) == 1
    assert choose_miner([slow, fast, new]) == 2


def test_reputation_rule():
    from covey.coordinator.scores import next_reputation

    assert next_reputation(1.0, True) == 0.8
    assert next_reputation(1.0, False) == 1.01
    assert next_reputation(0.1, True) == 0.1 and next_reputation(10.0, False) == 10.0


def _session(registry, name: str, slots: int = 1, kind: type | None = None):
    from covey.coordinator.miners import MinerSession
    from covey.protocol import Hardware, Hello, ModelOffer

    offer = ModelOffer(name="m", sha256="a" * 64, context_length=1024, backend="test")
    hello = Hello.model_construct(public_key=name * 64, models=(offer,), slots=slots,
                                  hardware=Hardware(cpu_count=1, ram_bytes=0))
    s = (kind or MinerSession)(miner_id=name * 64, hello=hello, websocket=None)  # type: ignore[arg-type]
    registry.add(s)
    return s


def test_a_new_request_is_not_held_behind_a_failover_that_cannot_use_the_free_miner():
    import asyncio

    from covey.coordinator.miners import MinerRegistry
    from covey.coordinator.router import Dispatcher, QueuePolicy

    async def scenario() -> None:
        registry = MinerRegistry()
        d = Dispatcher(registry, QueuePolicy(timeout=5))
        a, b = _session(registry, "a"), _session(registry, "b")
        first = await d.acquire("m", "u1")
        second = await d.acquire("m", "u2")
        assert {first, second} == {a, b}
        # The job on `first` fails: its failover may not go back to `first`, and waits.
        d.release(first, "u1")
        failover = asyncio.ensure_future(d.acquire("m", "u1", "a" * 64,
                                                   frozenset({first.miner_id}), priority=True))
        await asyncio.sleep(0)
        assert not failover.done()
        # A new request takes the free miner at once instead of queueing behind it.
        fresh = await asyncio.wait_for(d.acquire("m", "u3"), 1)
        assert fresh is first
        d.release(second, "u2")
        assert await asyncio.wait_for(failover, 1) is second

    asyncio.run(scenario())


def test_a_freed_slot_goes_to_the_account_with_fewer_jobs_running():
    import asyncio

    from covey.coordinator.miners import MinerRegistry
    from covey.coordinator.router import Dispatcher, QueuePolicy

    async def scenario() -> None:
        registry = MinerRegistry()
        d = Dispatcher(registry, QueuePolicy(timeout=5))
        s = _session(registry, "a")
        held = await d.acquire("m", "flood")
        floods = [asyncio.ensure_future(d.acquire("m", "flood")) for _ in range(3)]
        await asyncio.sleep(0)
        other = asyncio.ensure_future(d.acquire("m", "other"))
        await asyncio.sleep(0)
        assert d.waiting("m") == 4
        d.release(held, "flood")
        assert await asyncio.wait_for(other, 1) is s
        assert not any(f.done() for f in floods)
        for f in floods:
            f.cancel()

    asyncio.run(scenario())


def test_the_registry_answers_from_its_index_until_told_of_a_change():
    """``serving`` and ``offers`` are kept per model between changes (requests ask several
    times each); joining, leaving and a hold for a trial, once notified, show at once."""
    from covey.coordinator.miners import MinerRegistry

    registry = MinerRegistry()
    a = _session(registry, "a")
    assert registry.serving("m") == (a,) and registry.serving("m") is registry.serving("m")
    b = _session(registry, "b")
    assert registry.serving("m") == (a, b)
    assert [o.name for o in registry.offers("m")] == ["m", "m"]
    b.held.add("m")  # on trial: what the trial code does, then it notifies
    registry.notify()
    assert registry.serving("m") == (a,) and len(registry.offers("m")) == 1
    registry.remove(a)
    assert registry.serving("m") == () and registry.offers("m") == ()
    assert registry.serving("other") == ()


def test_unless_client_leaves_cancels_the_work_and_leaves_the_caller_usable():
    import asyncio

    from covey.protocol.openai_stream import unless_client_leaves

    async def main() -> None:
        hang_up = asyncio.Event()

        async def receive() -> dict:
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def answer() -> str:
            await asyncio.sleep(0)
            return "done"

        assert await unless_client_leaves(receive, answer()) == (True, "done")
        stopped = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                stopped.set()

        asyncio.get_running_loop().call_later(0.01, hang_up.set)
        assert await unless_client_leaves(receive, forever()) == (False, None)
        assert stopped.is_set()
        await asyncio.sleep(0)  # the caller's task is not left cancelled
        # A cancellation from outside still goes through.
        stays = asyncio.Event()

        async def client_stays() -> dict:
            await stays.wait()
            return {"type": "http.disconnect"}

        stopped.clear()
        outer = asyncio.ensure_future(unless_client_leaves(client_stays, forever()))
        await asyncio.sleep(0.01)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer
        assert stopped.is_set()

        async def broken() -> dict:
            raise RuntimeError("the channel failed")

        stopped.clear()  # a receive channel that fails counts as the client gone
        assert await unless_client_leaves(broken, forever()) == (False, None)
        assert stopped.is_set()

    asyncio.run(main())


def test_a_replica_uses_its_own_miners_before_another_replicas():
    """Another replica's miner may look idle from here (its jobs from there are counted
    only from reports) and costs a relay: it gets a job only when no miner of this replica
    has a slot free."""
    import asyncio

    from covey.coordinator.miners import MinerRegistry
    from covey.coordinator.remote import RemoteSession
    from covey.coordinator.router import Dispatcher, QueuePolicy

    async def scenario() -> None:
        registry = MinerRegistry()
        d = Dispatcher(registry, QueuePolicy(timeout=5))
        far = _session(registry, "f", slots=4, kind=RemoteSession)
        near = _session(registry, "n", slots=2)
        assert [await d.acquire("m", "u") for _ in range(3)] == [near, near, far]
        # Among many free miners (routing samples them), the one of its own still wins.
        crowd = MinerRegistry()
        d = Dispatcher(crowd, QueuePolicy(timeout=5))
        for i in range(40):
            _session(crowd, f"r{i:02d}", slots=4, kind=RemoteSession)
        mine = _session(crowd, "z", slots=20)
        assert [await d.acquire("m", "u") for _ in range(20)] == [mine] * 20

    asyncio.run(scenario())
