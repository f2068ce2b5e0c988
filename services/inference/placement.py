"""Where new replicas go: pure rules, no I/O, so that they can be read and tested alone.

- A deployment has at most one replica per node (a node runs one copy of a model; more
  parallelism on one node is `instances`), so replicas land on distinct nodes.
- A replica needs a free model slot and its memory on the node; among the nodes that fit, the
  emptiest wins, which spreads replicas and tenants.
- When capacity is short, replicas that bring a deployment up to its min_replicas go first,
  then the tenant holding the fewest replicas is served before one holding more (its share),
  then the oldest deployment. Nothing is ever evicted to make room: one tenant's autoscaling
  never takes another's min_replicas away.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Room:
    """A node as placement sees it: what is free, and which deployments it holds."""

    node: str
    free_slots: int
    free_memory_mb: int
    holds: set[str] = field(default_factory=set)  # deployment ids

    def fits(self, deployment_id: str, memory_mb: int) -> bool:
        return deployment_id not in self.holds and self.free_slots >= 1 and self.free_memory_mb >= memory_mb

    def take(self, deployment_id: str, memory_mb: int) -> None:
        self.holds.add(deployment_id)
        self.free_slots -= 1
        self.free_memory_mb -= memory_mb


@dataclass(frozen=True)
class Demand:
    """Replicas one deployment is missing."""

    deployment_id: str
    tenant: str
    missing: int
    below_min: int  # how many of the missing ones bring it up to min_replicas
    memory_mb: int  # of one replica
    order: float = 0.0  # creation time: older first among equals


@dataclass
class Plan:
    placed: list[tuple[str, str]]  # (deployment id, node), in the order they were granted
    short: dict[str, str]  # deployment id -> why some of its replicas have no node


def plan(demands: list[Demand], rooms: list[Room], replicas_by_tenant: dict[str, int]) -> Plan:
    """Grant replicas one at a time, fairly, until every demand is met or nothing fits."""
    held = dict(replicas_by_tenant)
    granted: dict[str, int] = {}
    result = Plan([], {})
    open_demands = [d for d in demands if d.missing > 0]
    while open_demands:
        demand = min(open_demands, key=lambda d: _priority(d, granted.get(d.deployment_id, 0), held))
        room = best_room(rooms, demand.deployment_id, demand.memory_mb)
        if room is None:
            result.short[demand.deployment_id] = shortage(rooms, demand.deployment_id, demand.memory_mb)
            open_demands.remove(demand)
            continue
        room.take(demand.deployment_id, demand.memory_mb)
        result.placed.append((demand.deployment_id, room.node))
        granted[demand.deployment_id] = granted.get(demand.deployment_id, 0) + 1
        held[demand.tenant] = held.get(demand.tenant, 0) + 1
        if granted[demand.deployment_id] >= demand.missing:
            open_demands.remove(demand)
    return result


def _priority(demand: Demand, granted: int, held: dict[str, int]) -> tuple:
    below_min = granted < demand.below_min
    return (not below_min, held.get(demand.tenant, 0), demand.order, demand.deployment_id)


def best_room(rooms: list[Room], deployment_id: str, memory_mb: int) -> Room | None:
    fitting = [room for room in rooms if room.fits(deployment_id, memory_mb)]
    if not fitting:
        return None
    return min(fitting, key=lambda room: (-room.free_slots, -room.free_memory_mb, room.node))


def shortage(rooms: list[Room], deployment_id: str, memory_mb: int) -> str:
    """Why no node takes one more replica of the deployment, in words an operator can act on."""
    if not rooms:
        return "no node is ready to take replicas (`maas nodes list` shows why)"
    others = [room for room in rooms if deployment_id not in room.holds]
    if not others:
        return f"every ready node ({len(rooms)}) already holds a replica of it: add nodes or lower the replicas"
    if not any(room.free_slots >= 1 for room in others):
        return f"no model slot is free on the {len(others)} node(s) that could take it"
    most = max(room.free_memory_mb for room in others if room.free_slots >= 1)
    return f"a replica needs an estimated {memory_mb} MB; the most a node has free is {most} MB"
