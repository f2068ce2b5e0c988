"""The placement rules (services/inference/placement.py): distinct nodes, capacity, fairness."""

from __future__ import annotations

from services.inference.placement import Demand, Room, plan


def rooms(*specs: tuple[str, int, int]) -> list[Room]:
    return [Room(name, slots, memory) for name, slots, memory in specs]


def test_replicas_go_to_distinct_nodes_the_emptiest_first():
    fleet = rooms(("a", 2, 4000), ("b", 5, 4000), ("c", 3, 4000))
    result = plan([Demand("web", "acme", missing=2, below_min=2, memory_mb=300)], fleet, {})
    assert result.placed == [("web", "b"), ("web", "c")] and result.short == {}


def test_a_node_holding_a_replica_never_gets_a_second():
    fleet = rooms(("a", 8, 4000), ("b", 8, 4000))
    fleet[0].holds.add("web")
    result = plan([Demand("web", "acme", missing=2, below_min=2, memory_mb=300)], fleet, {})
    assert result.placed == [("web", "b")]
    assert "already holds a replica" in result.short["web"]


def test_slots_and_memory_bound_what_fits_and_the_reason_says_which():
    no_slots = plan([Demand("web", "acme", 1, 1, 300)], rooms(("a", 0, 4000)), {})
    assert no_slots.placed == [] and "no model slot is free" in no_slots.short["web"]
    no_memory = plan([Demand("web", "acme", 1, 1, 3000)], rooms(("a", 4, 2000), ("b", 4, 1000)), {})
    assert no_memory.placed == [] and "needs an estimated 3000 MB; the most a node has free is 2000 MB" in no_memory.short["web"]
    nothing = plan([Demand("web", "acme", 1, 1, 300)], [], {})
    assert "no node is ready" in nothing.short["web"]


def test_min_replicas_are_served_before_any_tenant_grows_beyond_its_own():
    # One slot left: the deployment below its min_replicas gets it, though its tenant holds more.
    fleet = rooms(("a", 1, 4000))
    demands = [
        Demand("grow", "small", missing=1, below_min=0, memory_mb=300, order=1),
        Demand("needs", "big", missing=1, below_min=1, memory_mb=300, order=2),
    ]
    result = plan(demands, fleet, {"small": 1, "big": 9})
    assert result.placed == [("needs", "a")] and "grow" in result.short


def test_when_room_is_short_the_tenant_holding_fewer_replicas_goes_first():
    fleet = rooms(("a", 1, 4000), ("b", 1, 4000), ("c", 1, 4000))
    demands = [
        Demand("hog", "hog", missing=3, below_min=0, memory_mb=300, order=1),
        Demand("fair", "fair", missing=3, below_min=0, memory_mb=300, order=2),
    ]
    result = plan(demands, fleet, {"hog": 4, "fair": 0})
    granted = [deployment for deployment, _ in result.placed]
    # fair holds none, hog four: fair is granted until it catches up, and takes all three slots.
    assert granted == ["fair", "fair", "fair"]


def test_equal_tenants_share_short_room_alternately():
    fleet = rooms(("a", 2, 9000), ("b", 2, 9000))
    demands = [
        Demand("one", "t1", missing=2, below_min=0, memory_mb=300, order=1),
        Demand("two", "t2", missing=2, below_min=0, memory_mb=300, order=2),
    ]
    result = plan(demands, fleet, {})
    granted = [deployment for deployment, _ in result.placed]
    assert sorted(granted) == ["one", "one", "two", "two"]
    assert granted[:2] in (["one", "two"], ["two", "one"])


def test_placement_never_evicts():
    # A full fleet: nothing is taken from anyone to make room; the newcomer is short.
    fleet = rooms(("a", 0, 4000), ("b", 0, 4000))
    result = plan([Demand("late", "t", missing=1, below_min=1, memory_mb=300)], fleet, {"t": 0, "other": 4})
    assert result.placed == [] and "late" in result.short
