"""The request cache, usage metering and the audit log through the real gateway against a
real redis-server (and the gateway's SQLite database)."""

from __future__ import annotations

import asyncio
import datetime
import time

import grpc
import numpy as np
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from maas.common.v1 import common_pb2
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2
from maas.registry.v1 import registry_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.database import make_engine
from services.gateway.cache import LOOKUPS
from services.gateway.store import AuditFilter, GatewayStore
from services.gateway.usage import usage_key
from tests.unit.gateway.gateway_fakes import gateway_stack, route


@pytest.fixture
async def stack(tmp_path, redis_server):
    async with gateway_stack(tmp_path, redis_url=redis_server.url) as started:
        await started.wait_for_routes()
        yield started


def predict_request(deployment: str, values: np.ndarray) -> inference_pb2.PredictRequest:
    tensor = common_pb2.Tensor(
        name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=values.shape, raw=values.tobytes()
    )
    return inference_pb2.PredictRequest(deployment=deployment, inputs=[tensor])


def infer_request(deployment: str, values: np.ndarray, request_id: str) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=deployment, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=values.shape)
    request.raw_input_contents.append(values.tobytes())
    return request


def lookups(result: str) -> float:
    return LOOKUPS.labels(result)._value.get()


async def predict(
    stack, who: str, deployment: str, values: np.ndarray, metadata=()
) -> inference_pb2.PredictResponse:
    return await stack.inference_stub.Predict(
        predict_request(deployment, values), metadata=stack.auth(who) + tuple(metadata)
    )


async def settle(stack) -> None:
    """Let the gateway's background cache writes land."""
    await asyncio.sleep(0.1)


async def test_cacheable_deployment_serves_repeats_from_redis(stack):
    values = np.arange(4, dtype=np.float32).reshape(1, 4)
    hits, misses = lookups("hit"), lookups("miss")
    first = await predict(stack, "reader", "cached", values)
    await settle(stack)
    second = await predict(stack, "developer", "cached", values)  # another key, same tenant
    assert second == first
    assert len(stack.triton.requests) == 1
    assert (lookups("hit") - hits, lookups("miss") - misses) == (1, 1)
    # Other inputs, and non-cacheable deployments, go to Triton.
    await predict(stack, "reader", "cached", values + 1)
    await predict(stack, "reader", "mlp", values)
    await predict(stack, "reader", "mlp", values)
    assert len(stack.triton.requests) == 4


async def test_cache_never_crosses_tenants(stack):
    values = np.ones((1, 4), np.float32)
    await predict(stack, "reader", "cached", values)
    await settle(stack)
    # Same deployment name, same inputs, another tenant: its own miss.
    await predict(stack, "other", "cached", values)
    assert [r.model_name for r in stack.triton.requests] == ["acme--cached--1", "other--cached--1"]


async def test_new_version_never_serves_old_entries(stack):
    values = np.full((1, 4), 2, np.float32)
    await predict(stack, "reader", "cached", values)
    await settle(stack)
    stack.routing.publish([route("acme", "cached", stack.triton_address, cacheable=True, version=2)])
    for _ in range(200):
        response = await predict(stack, "reader", "cached", values)
        if response.version == 2:
            break
        await asyncio.sleep(0.01)
    assert response.version == 2
    assert stack.triton.requests[-1].model_name == "acme--cached--2"


async def test_no_cache_metadata_bypasses_the_cache(stack):
    values = np.full((1, 4), 3, np.float32)
    await predict(stack, "reader", "cached", values)
    await settle(stack)
    await predict(stack, "reader", "cached", values, metadata=(("cache-control", "no-cache"),))
    assert len(stack.triton.requests) == 2
    await predict(stack, "reader", "cached", values)
    assert len(stack.triton.requests) == 2


async def test_oip_model_infer_is_cached_with_the_callers_request_id(stack):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    values = np.full((1, 4), 4, np.float32)
    first = await stub.ModelInfer(infer_request("cached", values, "one"), metadata=stack.auth("reader"))
    await settle(stack)
    second = await stub.ModelInfer(infer_request("cached", values, "two"), metadata=stack.auth("reader"))
    assert len(stack.triton.requests) == 1
    assert (first.id, second.id) == ("one", "two")
    assert second.model_name == "cached" and second.model_version == "1"
    assert second.raw_output_contents == first.raw_output_contents


async def test_usage_is_metered_per_key_and_flushed_to_sql(stack):
    values = np.zeros((1, 4), np.float32)
    for _ in range(3):
        await predict(stack, "admin", "cached", values)
        await settle(stack)
    with pytest.raises(grpc.aio.AioRpcError):
        await predict(stack, "admin", "broken", values)
    await predict(stack, "developer", "mlp", values)

    # Any key of the tenant may read the tenant's usage.
    usage = await stack.admin.GetUsage(
        admin_pb2.GetUsageRequest(api_key_id=stack.key_ids["admin"]), metadata=stack.auth("reader")
    )
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    [row] = usage.rows
    assert (row.day, row.tenant, row.api_key_id) == (today, "acme", stack.key_ids["admin"])
    assert (row.requests, row.cache_hits, row.errors) == (4, 2, 1)
    assert row.input_bytes > 0 and row.output_bytes > 0

    whole = await stack.admin.GetUsage(
        admin_pb2.GetUsageRequest(tenant="acme", start_day=today, end_day=today),
        metadata=stack.auth("admin-of-admin"),
    )
    # Every key's calls, the reader's readiness polls of the fixture included.
    [total] = whole.rows
    assert total.api_key_id == "" and total.requests > 5 and total.errors == 1
    # A non-admin reads only its own tenant.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.GetUsage(admin_pb2.GetUsageRequest(tenant="other"), metadata=stack.auth("reader"))
    assert error.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.GetUsage(
            admin_pb2.GetUsageRequest(start_day="yesterday"), metadata=stack.auth("reader")
        )
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_mutating_calls_are_audited_with_filters_and_pages(stack):
    root = stack.auth("admin-of-admin")
    await stack.admin.CreateTenant(admin_pb2.CreateTenantRequest(name="globex"), metadata=root)
    await stack.registry_stub.CreateModel(
        registry_pb2.CreateModelRequest(name="digits"), metadata=stack.auth("developer")
    )
    with pytest.raises(grpc.aio.AioRpcError):  # a reader may not create: audited as denied
        await stack.registry_stub.CreateModel(
            registry_pb2.CreateModelRequest(name="nope"), metadata=stack.auth("reader")
        )
    await stack.registry_stub.GetModel(
        registry_pb2.GetModelRequest(name="digits"), metadata=stack.auth("reader")
    )

    listed = await stack.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(tenant="acme"), metadata=root)
    events = [(e.method.rpartition("/")[2], e.resource, e.code, e.api_key_id) for e in listed.audit_events]
    assert events == [
        ("CreateModel", "", "PERMISSION_DENIED", stack.key_ids["reader"]),
        ("CreateModel", "digits", "OK", stack.key_ids["developer"]),
    ]
    # Onboarding in the fixture created tenants and keys: page through them, newest first.
    seen, token = [], ""
    while True:
        page = await stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(tenant="admin", page_size=2, page_token=token), metadata=root
        )
        seen += page.audit_events
        token = page.next_page_token
        if not token:
            break
    assert [e.method.rpartition("/")[2] for e in seen] == ["CreateTenant"] + ["CreateApiKey"] * 4 + [
        "CreateTenant"
    ] * 2
    assert seen[0].resource == "globex" and [e.time.ToNanoseconds() for e in seen] == sorted(
        (e.time.ToNanoseconds() for e in seen), reverse=True
    )
    by_method = await stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(method="CreateTenant", api_key_id=seen[0].api_key_id), metadata=root
    )
    assert len(by_method.audit_events) == 3
    later = Timestamp()
    later.FromDatetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1))
    empty = await stack.admin.ListAuditEvents(
        admin_pb2.ListAuditEventsRequest(start_time=later), metadata=root
    )
    assert list(empty.audit_events) == []
    # Keys appear by id only.
    for event in seen:
        assert not any(key in str(event) for key in stack.keys.values())


async def test_acknowledged_changes_have_their_audit_row_and_usage_before_any_flush(stack, redis_server):
    """No acknowledged change waits in gateway memory: a kill -9 right after the answers would
    find every audit row in SQL and every change's request in Redis (no flush, no background
    round). Inference calls no limit binds are admitted from a lease: their requests reach
    Redis with the next push."""
    store = GatewayStore(make_engine(stack.settings.gateway_database_url))
    before = len(store.list_audit_events(AuditFilter(tenant="acme"), "", 1000))
    for index in range(10):
        await stack.registry_stub.CreateModel(
            registry_pb2.CreateModelRequest(name=f"m{index}"), metadata=stack.auth("developer")
        )
        await stack.admin.SetApiKeyRateLimit(
            admin_pb2.SetApiKeyRateLimitRequest(id=stack.key_ids["reader"]), metadata=stack.auth("admin")
        )
    after = store.list_audit_events(AuditFilter(tenant="acme"), "", 1000)
    assert len(after) - before == 20
    store.engine.dispose()

    values = np.zeros((1, 4), np.float32)
    for _ in range(7):
        await predict(stack, "developer", "mlp", values)
    client = redis.Redis.from_url(redis_server.url)
    day = datetime.datetime.now(datetime.UTC).date().isoformat()
    key = usage_key(day, "acme", stack.key_ids["developer"])
    # The developer's 10 CreateModel calls, counted by the admitting script.
    assert int(client.hget(key, "requests")) >= 10
    # And its 7 Predict calls: the first by the script, the others from its lease, pushed later.
    deadline = time.monotonic() + 5
    while int(client.hget(key, "requests")) < 17 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert int(client.hget(key, "requests")) == 17
    client.close()
