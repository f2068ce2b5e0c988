"""Replicas over several nodes, with a fake Triton per node: placement on distinct nodes,
PENDING with the reason, a node going down or draining, scaling in and to zero and waking, the
tenant's replica cap, and a restarted service that adopts what the nodes already hold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.inference.caps import TenantCaps
from services.inference.deployments import Deployments, DeploymentSpec
from services.inference.nodes import DOWN, DRAINING, NODE_READY, NodeSet
from services.inference.store import PENDING, READY, SCALED_TO_ZERO
from tests.unit.inference.conftest import build_deployments
from tests.unit.inference.inference_fakes import TENANT, FakeTriton, fake_fleet
from tests.unit.inference.test_inference_service import predict_request


def make(store, registry, nodes: NodeSet, tmp_path: Path, **options) -> Deployments:
    return build_deployments(store, registry, nodes, tmp_path, drain_seconds=0, **options)


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[NodeSet, list[FakeTriton]]:
    return fake_fleet(tmp_path / "fleet", 3)


@pytest.fixture
async def service(store, registry, fleet, tmp_path: Path) -> AsyncIterator[Deployments]:
    nodes, _ = fleet
    deployments = make(store, registry, nodes, tmp_path, caps=TenantCaps(max_replicas=6))
    await deployments.converger.restore()
    await deployments.converger.reconcile()
    yield deployments
    await deployments.close()


async def until(condition, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := await condition() if asyncio.iscoroutinefunction(condition) else condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
    return value


def ready_on(service: Deployments, name: str = "web") -> list[str]:
    route = service.routes.get(TENANT, name)
    return route.ready_nodes() if route else []


def holders(tritons: list[FakeTriton], triton_model: str) -> list[str]:
    return [t.address for t in tritons if triton_model in t.loaded]


async def test_replicas_land_on_distinct_nodes_and_all_serve(service, fleet):
    _, tritons = fleet
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, min_replicas=2))
    await until(lambda: len(ready_on(service)) == 2)
    deployment = await service.get(TENANT, "web")
    assert deployment.state == READY and len(set(ready_on(service))) == 2
    assert len(holders(tritons, deployment.triton_model)) == 2
    for _ in range(20):
        await service.serving.predict(TENANT, predict_request())
    assert sum(bool(t.requests) for t in tritons) == 2, "both replicas should answer"


async def test_a_deployment_that_does_not_fit_is_pending_with_the_reason_then_placed(service, fleet):
    nodes, tritons = fleet
    await service.converger.node_down(nodes.named("triton-2"))
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, min_replicas=3))
    pending = await until(lambda: service.routes.get(TENANT, "web").deployment.state == PENDING and service.routes.get(TENANT, "web").deployment)
    assert "waiting for room for 3 replica(s)" in pending.message and "already holds" in pending.message
    assert all(not t.loaded for t in tritons), "nothing is half-placed"
    await service.converger.node_up(nodes.named("triton-2"))
    await service.converger.fill()
    await until(lambda: len(ready_on(service)) == 3)
    assert (await service.get(TENANT, "web")).state == READY


async def test_a_dead_nodes_replica_leaves_the_route_and_is_placed_on_a_survivor(service, fleet):
    nodes, tritons = fleet
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, min_replicas=2))
    placed = await until(lambda: len(ready_on(service)) == 2 and ready_on(service))
    dead = nodes.named(placed[0])
    await service.converger.node_down(dead)
    assert placed[0] not in ready_on(service) and dead.state == DOWN
    await service.serving.predict(TENANT, predict_request())  # the other replica serves meanwhile
    await service.converger.fill()
    now = await until(lambda: len(ready_on(service)) == 2 and ready_on(service))
    assert placed[0] not in now and placed[1] in now


async def test_the_node_that_comes_back_is_reconciled_and_used_again(service, fleet):
    nodes, tritons = fleet
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1))
    (first,) = await until(lambda: ready_on(service))
    node = nodes.named(first)
    triton = next(t for t in tritons if t.address == node.address)
    await service.converger.node_down(node)
    triton.loaded.add("m_stale_0")  # what a node held before it went away
    await service.converger.node_up(node)
    assert "m_stale_0" not in triton.loaded and node.state == NODE_READY


async def test_a_drained_node_keeps_serving_until_its_replacement_is_ready(service, fleet):
    nodes, tritons = fleet
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, min_replicas=2))
    placed = await until(lambda: len(ready_on(service)) == 2 and ready_on(service))
    drained = nodes.cordon(placed[0], True)
    assert drained.state == DRAINING
    # Still routed: its replacement is not ready yet.
    assert placed[0] in ready_on(service)
    await service.converger.fill()
    await until(lambda: len(ready_on(service)) == 3)  # the replacement is ready beside it
    await service.converger.fill()  # now the drained replica goes
    assert len(ready_on(service)) == 2 and placed[0] not in ready_on(service)
    model = (await service.get(TENANT, "web")).triton_model
    await until(lambda: nodes.named(placed[0]).address not in holders(tritons, model))
    nodes.cordon(placed[0], False)
    assert nodes.named(placed[0]).state == NODE_READY


async def test_scaling_in_and_to_zero_then_a_request_wakes_it(service, fleet, store):
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, min_replicas=0, max_replicas=3))
    await until(lambda: len(ready_on(service)) == 1)
    route = service.routes.get(TENANT, "web")
    await service.autoscaler._scale(route, 0, "idle in this test")
    await until(lambda: service.routes.get(TENANT, "web").deployment.state == SCALED_TO_ZERO)
    assert ready_on(service) == []
    answer = await service.serving.predict(TENANT, predict_request(), timeout=5)
    assert answer.version == 1 and len(ready_on(service)) == 1
    events = store.scaling_events(route.deployment.id)
    assert [(e.from_replicas, e.to_replicas) for e in events] == [(0, 1), (1, 0)]
    assert events[0].reason == "a request arrived while scaled to zero"


async def test_the_tenant_replica_cap_names_itself_and_a_quota_raises_it(service):
    await service.create(TENANT, DeploymentSpec(name="a", model="digits", version=1, min_replicas=2, max_replicas=4))
    with pytest.raises(ResourceExhausted, match="at most 6 replicas.*reserve 4 and this one asks for 3"):
        await service.create(TENANT, DeploymentSpec(name="b", model="digits", version=1, max_replicas=3))
    await service.create(TENANT, DeploymentSpec(name="b", model="digits", version=1, max_replicas=3), replica_cap=8)
    with pytest.raises(ResourceExhausted, match="at most 8 replicas"):
        await service.update(TENANT, DeploymentSpec(name="b", max_replicas=5), ["max_replicas"], replica_cap=8)


async def test_a_restarted_service_adopts_what_the_nodes_hold_and_loads_nothing_twice(
    service, fleet, store, registry, tmp_path
):
    nodes, tritons = fleet
    await service.create(TENANT, DeploymentSpec(name="web", model="digits", version=1, min_replicas=2))
    placed = await until(lambda: len(ready_on(service)) == 2 and ready_on(service))
    await service.close()
    loads = sum(len(t.loads) for t in tritons)
    restarted = make(store, registry, nodes, tmp_path)
    try:
        await restarted.converger.restore()
        await restarted.converger.reconcile()
        assert ready_on(restarted) == placed
        assert sum(len(t.loads) for t in tritons) == loads, "a replica the node held was loaded again"
        assert (await restarted.serving.predict(TENANT, predict_request())).version == 1
    finally:
        await restarted.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (DeploymentSpec(name="web", model="digits", version=1, min_replicas=-1), "min_replicas must be between 0 and 64"),
        (DeploymentSpec(name="web", model="digits", version=1, min_replicas=65), "min_replicas must be between 0 and 64"),
        (DeploymentSpec(name="web", model="digits", version=1, max_replicas=65), "max_replicas must be between 1 and 64"),
        (DeploymentSpec(name="web", model="digits", version=1, min_replicas=3, max_replicas=2), r"max_replicas \(2\) must not be below min_replicas \(3\)"),
        (DeploymentSpec(name="web", model="digits", version=1, target_in_flight=-5), "target_in_flight must be between 1 and"),
    ],
)
async def test_replica_settings_out_of_range_are_refused_with_what_is_allowed(service, spec, message):
    with pytest.raises(InvalidArgument, match=message):
        await service.create(TENANT, spec)
    assert service.routes.get(TENANT, "web") is None


async def test_a_node_name_that_is_not_a_node_is_not_found(service):
    for name in ("triton-9", "", "../etc", "x" * 500):
        with pytest.raises(NotFound, match="maas nodes list"):
            service.nodes.cordon(name, True)
