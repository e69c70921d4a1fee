"""The fair order (deployments/runtime/fair_share.py): weights give their share of the steps over a
long run, a key with nothing queued takes nothing and banks nothing, one key's items keep their order."""

from __future__ import annotations

import math
import random

import pytest

from deployments.runtime.fair_share import FairShare


@pytest.mark.parametrize("weights", [(1.0, 3.0), (1.0, 1.0), (2.5, 1.0)])
def test_backlogged_keys_take_steps_in_proportion_to_their_weights(weights):
    rng = random.Random(7)
    fair: FairShare[tuple[str, float]] = FairShare()
    taken = {"a": 0.0, "b": 0.0}
    for flow in taken:  # both always have work waiting; items of mixed sizes
        for _ in range(50):
            cost = rng.choice([0.25, 1.0, 2.0, 4.0]) * rng.choice([4, 8])
            fair.push(flow, (flow, cost), cost, weights[flow == "b"])
    for _ in range(20000):
        flow, cost = fair.pop()
        taken[flow] += cost
        fair.push(flow, (flow, cost), cost, weights[flow == "b"])  # refill: it stays backlogged
    assert taken["b"] / taken["a"] == pytest.approx(weights[1] / weights[0], rel=0.01)


def test_a_key_with_nothing_queued_takes_nothing_and_banks_nothing_for_its_idle_time():
    fair: FairShare[str] = FairShare()
    for i in range(100):
        fair.push("a", f"a{i}", 8.0)
    order = [fair.pop() for _ in range(50)]  # b idle: a takes every turn
    assert order == [f"a{i}" for i in range(50)]
    fair.push("b", "b0", 8.0)
    fair.push("b", "b1", 8.0)
    fair.push("b", "b2", 8.0)
    # b comes back at the current virtual time: next, then alternating, not 50 turns in a row
    assert [fair.pop() for _ in range(6)] == ["b0", "a50", "b1", "a51", "b2", "a52"]
    assert fair.pop(lambda item: item.startswith("b")) is None  # b has nothing left


def test_one_keys_items_keep_their_order_and_skipped_items_keep_their_place():
    fair: FairShare[tuple[str, int]] = FairShare()
    for i, size in enumerate([512, 1024, 512, 1024]):
        fair.push("a", (f"a{i}", size), 1.0)
    only_1024 = [fair.pop(lambda item: item[1] == 1024) for _ in range(3)]
    assert [item and item[0] for item in only_1024] == ["a1", "a3", None]
    assert [fair.pop()[0], fair.pop()[0]] == ["a0", "a2"]
    assert fair.pop() is None and not fair


def test_removed_items_leave_and_bad_weights_are_refused():
    fair: FairShare[int] = FairShare()
    for i in range(6):
        fair.push("a" if i % 2 else "b", i, 1.0)
    assert sorted(fair.remove(lambda item: item > 2)) == [3, 4, 5]
    assert sorted(fair.items()) == [0, 1, 2] and len(fair) == 3
    for weight in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError):
            fair.push("c", 9, 1.0, weight)


def test_what_a_key_took_without_waiting_counts_against_it():
    fair: FairShare[str] = FairShare()
    for _ in range(3):  # room downstream: a's first three went on at once
        fair.charge("a", 8.0)
    fair.push("a", "a3", 8.0)
    fair.push("b", "b0", 8.0)
    assert fair.pop() == "b0"  # b is served before a's fourth, which a's three already paid ahead of
