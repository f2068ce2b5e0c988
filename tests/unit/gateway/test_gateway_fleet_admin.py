"""The serving fleet through AdminService (ListNodes, DrainNode, ResumeNode: platform admins only,
answered by the inference service's FleetService) and the tenant's replica cap (Quota.max_replicas:
stored, and asserted to the inference service on every forwarded InferenceService call)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2

from services.common.channels import MAX_REPLICAS_KEY
from services.common.database import make_engine
from services.common.interceptors import INTERNAL_TOKEN_KEY
from services.gateway.server import MIGRATIONS
from services.gateway.service import quota_columns
from services.gateway.store import BillableRecord, GatewayStore, QuotaRecord, RateLimit
from tests.unit.gateway.gateway_fakes import TOKEN, gateway_stack

DRAINING, READY = inference_pb2.NODE_STATE_DRAINING, inference_pb2.NODE_STATE_READY


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as started:
        yield started


async def audit_events(stack, method: str) -> list[admin_pb2.AuditEvent]:
    """The method's audit events, once there are any: a refusal's row may be written just after
    the caller heard the answer."""
    for _ in range(50):
        events = await stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(method=method), metadata=stack.auth("admin-of-admin")
        )
        if events.audit_events:
            break
        await asyncio.sleep(0.05)
    return list(events.audit_events)


async def test_the_platform_admin_lists_drains_and_resumes_nodes(stack):
    root = stack.auth("admin-of-admin")
    listed = await stack.admin.ListNodes(admin_pb2.ListNodesRequest(), metadata=root)
    assert [node.name for node in listed.nodes] == ["triton-0", "triton-1"]
    assert stack.fleet.metadata[-1][INTERNAL_TOKEN_KEY] == TOKEN

    drained = await stack.admin.DrainNode(admin_pb2.DrainNodeRequest(name="triton-1"), metadata=root)
    assert drained.node.name == "triton-1" and drained.node.state == DRAINING
    resumed = await stack.admin.ResumeNode(admin_pb2.ResumeNodeRequest(name="triton-1"), metadata=root)
    assert resumed.node.state == READY

    for method in ("DrainNode", "ResumeNode"):
        (event,) = await audit_events(stack, method)
        assert (event.tenant, event.resource, event.code) == ("admin", "triton-1", "OK")


async def test_fleet_errors_reach_the_caller_as_the_inference_service_gave_them(stack):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.DrainNode(
            admin_pb2.DrainNodeRequest(name="triton-9"), metadata=stack.auth("admin-of-admin")
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "triton-9" in error.value.details()
    (event,) = await audit_events(stack, "DrainNode")
    assert event.code == "NOT_FOUND"


async def test_a_tenant_admin_may_not_touch_the_fleet(stack):
    acme = stack.auth("admin")
    for call, request in (
        (stack.admin.ListNodes, admin_pb2.ListNodesRequest()),
        (stack.admin.DrainNode, admin_pb2.DrainNodeRequest(name="triton-0")),
        (stack.admin.ResumeNode, admin_pb2.ResumeNodeRequest(name="triton-0")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call(request, metadata=acme)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "platform admin key" in error.value.details()
    assert stack.fleet.metadata == []  # the inference service was never asked
    assert stack.fleet.nodes["triton-0"].state == READY
    (event,) = await audit_events(stack, "DrainNode")
    assert (event.tenant, event.code) == ("acme", "PERMISSION_DENIED")


async def test_max_replicas_is_stored_and_asserted_to_the_inference_service(stack):
    root = stack.auth("admin-of-admin")
    quota = admin_pb2.Quota(tenant="acme", training_minutes_per_day=30, max_replicas=6)
    saved = await stack.admin.SetQuota(admin_pb2.SetQuotaRequest(quota=quota), metadata=root)
    assert saved.quota.max_replicas == 6
    got = await stack.admin.GetQuota(admin_pb2.GetQuotaRequest(tenant="acme"), metadata=root)
    assert (got.quota.max_replicas, got.quota.training_minutes_per_day) == (6, 30)

    # A client's own value never gets through: the gateway asserts the tenant's.
    forged = (MAX_REPLICAS_KEY, "999")
    request = inference_pb2.GetDeploymentRequest(name="web")
    await stack.inference_stub.GetDeployment(request, metadata=(*stack.auth("developer"), forged))
    assert stack.inference.metadata[-1][MAX_REPLICAS_KEY] == "6"
    # A tenant without a cap: nothing is asserted, and nothing the client sent is forwarded.
    await stack.inference_stub.GetDeployment(request, metadata=(*stack.auth("other"), forged))
    assert MAX_REPLICAS_KEY not in stack.inference.metadata[-1]
    # Only the inference service hears of replicas.
    await stack.registry_stub.GetModel(
        registry_pb2.GetModelRequest(name="m"), metadata=stack.auth("developer")
    )
    assert MAX_REPLICAS_KEY not in stack.registry.metadata[-1]


async def test_max_replicas_is_zero_for_quotas_set_before_it_existed(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
        connection.execute(sa.text("INSERT INTO tenants VALUES ('acme', 'Acme', '2026-01-01 00:00:00')"))
        connection.execute(
            sa.text("INSERT INTO quotas VALUES ('acme', 1, 2, 3, 4, 5, 6, 0.0, 0, 0, '2026-01-01 00:00:00')")
        )
        command.upgrade(config, "head")
    quota = GatewayStore(engine).get_quota("acme")
    assert quota is not None and quota.max_replicas == 0 and quota.requests_per_day == 1
    engine.dispose()


def test_quota_changes_of_different_budgets_at_once_both_stay(tmp_path):
    """Two admins merge their change into the same stale quota; each writes only its own columns."""
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.execute(sa.text("INSERT INTO tenants VALUES ('acme', 'Acme', '2026-01-01 00:00:00')"))
    store = GatewayStore(engine)
    now = datetime.now(UTC)
    store.set_quota(QuotaRecord("acme", requests_per_day=5, update_time=now))
    store.set_quota(QuotaRecord("acme", requests_per_day=100, update_time=now), {"requests_per_day"})
    stale = QuotaRecord("acme", requests_per_day=5, rate_limit=RateLimit(requests_per_second=200), update_time=now)
    store.set_quota(stale, quota_columns({"rate_limit.requests_per_second"}))
    quota = store.get_quota("acme")
    assert quota is not None
    assert (quota.requests_per_day, quota.rate_limit.requests_per_second) == (100, 200)
    engine.dispose()


def test_billable_usage_adds_up_per_day_resource_and_tier(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    store = GatewayStore(engine)
    store.add_billable_usage([
        BillableRecord("2026-11-30", "acme", "requests", "int8", 3),
        BillableRecord("2026-12-01", "acme", "requests", "int8", 5),
        BillableRecord("2026-12-01", "rival", "requests", "int8", 7),
    ])
    store.add_billable_usage([BillableRecord("2026-12-01", "acme", "requests", "int8", 2)])
    assert store.billable_usage("acme", "2026-12-01", "2026-12-31") == [
        BillableRecord("2026-12-01", "acme", "requests", "int8", 7)
    ]
    engine.dispose()
