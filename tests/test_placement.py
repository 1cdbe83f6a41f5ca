"""Placement of sharded models: pure functions, no network."""

from __future__ import annotations

import pytest

from covey.coordinator.placement import (
    Link,
    ShardMiner,
    missing_blocks,
    plan_chain,
    rebalance,
    suggest_range,
)


def _ids(plan):
    return [(link.miner_id, link.start, link.end) for link in plan.links]


def test_two_halves_chain_in_order():
    plan = plan_chain([ShardMiner("b", 15, 30), ShardMiner("a", 0, 15)], 30)
    assert plan is not None
    assert _ids(plan) == [("a", 0, 15), ("b", 15, 30)]


def test_a_gap_leaves_no_chain_and_is_named():
    miners = [ShardMiner("a", 0, 10), ShardMiner("b", 12, 30)]
    assert plan_chain(miners, 30) is None
    assert missing_blocks([(0, 10), (12, 30)], 30) == [(10, 12)]
    assert missing_blocks([], 4) == [(0, 4)]
    assert missing_blocks([(0, 4)], 4) == []


def test_overlapping_ranges_chain_through_part_of_a_range():
    # b holds 10:30 but is slower; after a (0:20) it runs only 20:30.
    plan = plan_chain([ShardMiner("a", 0, 20), ShardMiner("b", 10, 30, block_seconds=0.004)],
                      30)
    assert plan is not None
    assert _ids(plan) == [("a", 0, 20), ("b", 20, 30)]


def test_a_whole_model_miner_beats_a_chain_of_equal_speed():
    plan = plan_chain([ShardMiner("a", 0, 15), ShardMiner("b", 15, 30),
                       ShardMiner("c", 0, 30)], 30)
    assert plan is not None and _ids(plan) == [("c", 0, 30)]


def test_a_slow_node_is_avoided_when_a_faster_one_holds_its_blocks():
    miners = [ShardMiner("a", 0, 15, block_seconds=0.002),
              ShardMiner("slow", 15, 30, block_seconds=0.05),
              ShardMiner("fast", 15, 30, block_seconds=0.002)]
    plan = plan_chain(miners, 30)
    assert plan is not None and _ids(plan) == [("a", 0, 15), ("fast", 15, 30)]
    # …but it is used when it is the only one left.
    plan = plan_chain(miners, 30, exclude=frozenset({"fast"}))
    assert plan is not None and _ids(plan) == [("a", 0, 15), ("slow", 15, 30)]


def test_ties_are_deterministic_and_load_spreads_requests():
    miners = [ShardMiner("b", 0, 30), ShardMiner("a", 0, 30)]
    assert _ids(plan_chain(miners, 30)) == [("a", 0, 30)]
    busy = [ShardMiner("b", 0, 30, slots=4), ShardMiner("a", 0, 30, load=1, slots=4)]
    assert _ids(plan_chain(busy, 30)) == [("b", 0, 30)]


def test_a_miner_with_no_free_slot_is_not_planned():
    miners = [ShardMiner("a", 0, 15, load=1, slots=1), ShardMiner("b", 15, 30)]
    assert plan_chain(miners, 30) is None
    assert missing_blocks([(15, 30)], 30) == [(0, 15)]


def test_a_sub_range_plan_rebuilds_one_link():
    miners = [ShardMiner("a", 0, 15), ShardMiner("b", 15, 30), ShardMiner("c", 10, 30)]
    plan = plan_chain(miners, 30, exclude=frozenset({"b"}), start=15, end=30)
    assert plan is not None and plan.links == (Link("c", 15, 30),)
    with pytest.raises(ValueError):
        plan_chain(miners, 30, start=20, end=20)


def test_suggest_range_fills_the_gap_first():
    assert suggest_range([(0, 10), (20, 30)], 30, 10) == (10, 20)
    assert suggest_range([(0, 30)], 30, 15) == (0, 15)
    # The block held least decides, then the fewest copies in all.
    assert suggest_range([(0, 30), (0, 15)], 30, 15) == (15, 30)
    assert suggest_range([], 30, 50) == (0, 30)
    with pytest.raises(ValueError):
        suggest_range([], 30, 0)


def test_rebalance_moves_a_redundant_miner_into_the_gap():
    miners = [ShardMiner("a", 0, 15), ShardMiner("a2", 0, 15), ShardMiner("c", 15, 25)]
    move = rebalance(miners, 30)
    assert move == ("a", (15, 30))
    who, (s, e) = move
    after = [m for m in miners if m.miner_id != who] + [ShardMiner(who, s, e)]
    assert plan_chain(after, 30) is not None


def test_rebalance_never_opens_another_gap():
    # Every block has one holder: moving anyone would open a gap.
    assert rebalance([ShardMiner("a", 0, 10), ShardMiner("b", 10, 20)], 30) is None
    # Complete: nothing to do.
    assert rebalance([ShardMiner("a", 0, 30), ShardMiner("b", 0, 30)], 30) is None


def test_rebalance_moves_only_a_miner_that_allows_it():
    miners = [ShardMiner("a", 0, 15), ShardMiner("b", 0, 15)]
    assert rebalance(miners, 30, movable=frozenset({"b"})) == ("b", (15, 30))
    assert rebalance(miners, 30, movable=frozenset()) is None
