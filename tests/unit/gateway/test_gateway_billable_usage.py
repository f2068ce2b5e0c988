"""Billable usage through the real gateway (fake backends, a real redis-server, the gateway's
SQLite): every inference call that a model answered adds exactly its requests and tokens under
the price tier of the version that answered it; a call refused before the model, or failed in it,
adds nothing. Then the Meter's way to SQL: through Redis, straight from memory while Redis is
down, and back into memory when the SQL write fails."""

from __future__ import annotations

import asyncio
import datetime

import grpc
import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.common.database import make_engine, upgrade
from services.common.generation import Sampling, stream_request
from services.common.traffic import goes_to_canary
from services.gateway.auth import Caller
from services.gateway.generate import Generation, TokenAccount
from services.gateway.keys import Role
from services.gateway.redis_link import RedisLink
from services.gateway.server import MIGRATIONS
from services.gateway.store import BillableRecord, GatewayStore
from services.gateway.usage import Meter, billable_key
from tests.support.embedding import tokens_of
from tests.unit.gateway.gateway_fakes import closed_address, gateway_stack, route, serve
from tests.unit.gateway.test_gateway_embed import EmbeddingTriton, embedding_route
from tests.unit.gateway.test_gateway_limits import set_quota
from tests.unit.gateway.test_gateway_metering import infer_request, predict_request

GENERATE = inference_pb2.SERVING_TASK_GENERATE


def today() -> str:
    return datetime.datetime.now(datetime.UTC).date().isoformat()


def tiered(route_: inference_pb2.Route, tier: str) -> inference_pb2.Route:
    route_.tier = tier
    return route_


@pytest.fixture
async def stack(tmp_path, redis_server):
    embedder = EmbeddingTriton()
    embedder_server, embedder_address = await serve(
        (service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, embedder)
    )
    try:
        async with gateway_stack(tmp_path, redis_url=redis_server.url) as started:
            await started.wait_for_routes()
            address = started.triton_address
            split = tiered(route("acme", "split", address), "fp32")
            split.canary.CopyFrom(
                inference_pb2.CanaryRoute(
                    version=2,
                    triton_model="acme--split--2",
                    weight_percent=30,
                    replica_addresses=[address],
                    tier="distilled",
                )
            )
            started.routing.publish(
                [tiered(r, "fp32") for r in started.routing.routes]
                + [
                    tiered(route("acme", "small", address, cacheable=True), "int8"),
                    split,
                    tiered(route("acme", "writer", address, task=GENERATE), "fp16"),
                    tiered(embedding_route("acme", "minilm", embedder_address), "int8"),
                ]
            )
            await wait_for_route(started, "minilm")
            yield started
    finally:
        await embedder_server.stop(0)


async def wait_for_route(stack, deployment: str) -> None:
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    for _ in range(200):  # the gateway hears of the new table in the background
        if (await oip.ModelReady(service_pb2.ModelReadyRequest(name=deployment), metadata=stack.auth("reader"))).ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the gateway never heard of {deployment}")


async def billed(stack, tenant: str = "acme") -> dict[tuple[str, str], int]:
    """The tenant's billable usage today, (resource, tier) -> quantity, once the meter flushed
    (GetUsage flushes it first, to read its own writes)."""
    await stack.admin.GetUsage(admin_pb2.GetUsageRequest(tenant=tenant), metadata=stack.auth("admin-of-admin"))
    store = GatewayStore(make_engine(stack.settings.gateway_database_url))
    try:
        rows = store.billable_usage(tenant, today(), today())
    finally:
        store.engine.dispose()
    return {(row.resource, row.tier): row.quantity for row in rows}


async def predict(stack, deployment: str, who: str = "reader", request_id: str = "", **options):
    metadata = stack.auth(who) + ((("x-request-id", request_id),) if request_id else ())
    values = np.arange(4, dtype=np.float32).reshape(1, 4)
    return await stack.inference_stub.Predict(predict_request(deployment, values), metadata=metadata, **options)


async def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value.code()


async def collect(call) -> list:
    return [message async for message in call]


async def test_each_answered_call_is_one_request_of_its_versions_tier_cache_hits_included(stack):
    await predict(stack, "small")
    await asyncio.sleep(0.1)  # the cache write lands in the background
    await predict(stack, "small", who="developer")  # a hit: answered all the same
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)
    values = np.zeros((1, 4), np.float32)
    await oip.ModelInfer(infer_request("small", values, "one"), metadata=stack.auth("reader"))
    await predict(stack, "mlp")
    assert len(stack.triton.requests) == 3
    assert await billed(stack) == {("requests", "int8"): 3, ("requests", "fp32"): 1}


async def test_calls_refused_before_the_model_or_failed_in_it_are_not_billed(stack):
    bad_shape = inference_pb2.PredictRequest(deployment="mlp")
    bad_shape.inputs.add(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[1, 3], raw=b"\0" * 12)
    bad_call = stack.inference_stub.Predict(bad_shape, metadata=stack.auth("reader"))
    assert await refused(bad_call) is grpc.StatusCode.INVALID_ARGUMENT
    assert await refused(predict(stack, "nope")) is grpc.StatusCode.NOT_FOUND
    assert await refused(predict(stack, "loading", timeout=0.3)) in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert await refused(predict(stack, "broken")) is grpc.StatusCode.INTERNAL  # failed in the model
    # Another tenant's deployment does not exist for this one: nobody is billed.
    assert await refused(predict(stack, "small", who="other")) is grpc.StatusCode.NOT_FOUND
    assert await refused(collect(generate(stack, prompt=""))) is grpc.StatusCode.INVALID_ARGUMENT
    assert await refused(collect(generate(stack, prompt="a~b"))) is grpc.StatusCode.INVALID_ARGUMENT
    await set_quota(stack, "acme", tokens_per_day=10)
    assert await refused(collect(generate(stack, max_tokens=50))) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await billed(stack) == {}
    assert await billed(stack, "other") == {}


async def test_a_canary_split_bills_each_side_under_its_own_tier(stack):
    ids = [f"request-{number}" for number in range(40)]
    versions = [(await predict(stack, "split", request_id=request_id)).version for request_id in ids]
    to_canary = sum(goes_to_canary(request_id, 30) for request_id in ids)
    assert 0 < to_canary < len(ids) and versions.count(2) == to_canary
    assert await billed(stack) == {("requests", "fp32"): len(ids) - to_canary, ("requests", "distilled"): to_canary}


def generate(stack, who: str = "reader", timeout: float | None = None, **fields):
    fields.setdefault("deployment", "writer")
    fields.setdefault("prompt", "hi")
    request = inference_pb2.GenerateRequest(**fields)
    return stack.inference_stub.Generate(request, metadata=stack.auth(who), timeout=timeout)


async def test_a_generation_bills_its_prompt_and_completion_tokens(stack):
    *tokens, final = await collect(generate(stack, prompt="hello", max_tokens=4))
    assert (final.prompt_tokens, final.completion_tokens, len(tokens)) == (5, 4, 4)
    oip = service_pb2_grpc.GRPCInferenceServiceStub(stack.channel)

    async def requests():
        yield stream_request("hi", Sampling(max_tokens=2), "writer", "one")
        yield stream_request("hey", Sampling(max_tokens=3), "writer", "two")
        yield stream_request("", Sampling(), "writer", "refused at the gateway")
        yield stream_request("a~b", Sampling(), "writer", "refused by the model")

    responses = [r async for r in oip.ModelStreamInfer(requests(), metadata=stack.auth("reader"))]
    assert sum(bool(r.error_message) for r in responses) == 2
    assert await billed(stack) == {
        ("requests", "fp16"): 3,
        ("input_tokens", "fp16"): 5 + 2 + 3,
        ("output_tokens", "fp16"): 4 + 2 + 3,
    }


async def test_a_cancelled_generation_bills_what_was_streamed(stack):
    stack.triton.delay = 0.2  # a token every 0.2 s: the cancel lands well between two
    call = generate(stack, max_tokens=90)
    received = 0
    async for _ in call:
        received += 1
        if received == 3:
            call.cancel()
            break
    await asyncio.wait_for(stack.triton.cancelled.wait(), 2)
    await asyncio.sleep(0.2)  # the handler settles and bills as it unwinds
    assert await billed(stack) == {("requests", "fp16"): 1, ("input_tokens", "fp16"): 2, ("output_tokens", "fp16"): 3}


async def test_a_generation_its_deadline_ended_bills_what_was_streamed(stack):
    stack.triton.delay = 0.4  # tokens at 0.4 s and 0.8 s, the deadline at 1.0 s
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for message in generate(stack, max_tokens=90, timeout=1.0):
            received.append(message)
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(stack.triton.cancelled.wait(), 2)
    await asyncio.sleep(0.2)
    assert len(received) == 2
    assert await billed(stack) == {("requests", "fp16"): 1, ("input_tokens", "fp16"): 2, ("output_tokens", "fp16"): 2}


async def test_a_generation_that_fails_in_the_model_is_not_billed(stack):
    stack.triton.fail_after = 2  # the node dies after two tokens
    assert await refused(collect(generate(stack, max_tokens=10))) is grpc.StatusCode.UNAVAILABLE
    assert await billed(stack) == {}


async def test_an_embedding_bills_the_tokens_read_and_a_cache_hit_only_its_request(stack):
    texts = ["a sentence to embed", "and one more"]
    request = inference_pb2.EmbedRequest(deployment="minilm", texts=texts)
    first = await stack.inference_stub.Embed(request, metadata=stack.auth("reader"))
    assert first.prompt_tokens == sum(tokens_of(text) for text in texts)
    await asyncio.sleep(0.1)  # the cache write lands in the background
    await stack.inference_stub.Embed(request, metadata=stack.auth("reader"))
    assert await billed(stack) == {("requests", "int8"): 2, ("embedding_tokens", "int8"): first.prompt_tokens}


async def test_without_redis_the_counts_go_straight_to_sql(tmp_path):
    async with gateway_stack(tmp_path) as stack:  # Redis on a closed port
        await stack.wait_for_routes()
        tiny = tiered(route("acme", "tiny", stack.triton_address), "int8")
        stack.routing.publish([*stack.routing.routes, tiny])
        await wait_for_route(stack, "tiny")
        for _ in range(3):
            await predict(stack, "tiny")
        assert await billed(stack) == {("requests", "int8"): 3}


# -- the Meter's way to SQL ---------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    upgrade(engine, MIGRATIONS)
    yield GatewayStore(engine)
    engine.dispose()


def in_sql(store: GatewayStore, tenant: str = "acme") -> dict[tuple[str, str], int]:
    return {(row.resource, row.tier): row.quantity for row in store.billable_usage(tenant, today(), today())}


async def test_counts_travel_through_redis_into_sql_once(store, redis_server):
    link = RedisLink(redis_server.url, 1.0, 1.0)
    await link.start()
    meter = Meter(link, store, push_seconds=60, flush_seconds=60)
    try:
        meter.bill("acme", "requests", "int8")
        meter.bill("acme", "requests", "int8")
        meter.bill("acme", "output_tokens", "fp16", 40)
        meter.bill("acme", "output_tokens", "fp16", 0)  # nothing to count
        meter.bill("other", "requests", "")
        await meter.push()
        held = await link.client.hgetall(billable_key(today(), "acme"))
        assert held == {b"requests/int8": b"2", b"output_tokens/fp16": b"40"}
        await meter.flush()
        await meter.flush()  # taken from Redis once: a second flush adds nothing
        assert in_sql(store) == {("requests", "int8"): 2, ("output_tokens", "fp16"): 40}
        assert in_sql(store, "other") == {("requests", ""): 1}
        assert await link.client.exists(billable_key(today(), "acme")) == 0
    finally:
        await link.close()


async def test_redis_down_keeps_the_counts_in_memory_then_writes_them_to_sql(store, redis_server):
    link = RedisLink(redis_server.url, 0.5, 0.1)
    await link.start()
    meter = Meter(link, store, push_seconds=60, flush_seconds=60)
    try:
        meter.bill("acme", "requests", "fp32")
        await meter.push()  # in Redis
        await meter.flush()
        redis_server.kill()
        for _ in range(100):
            if not link.up:
                break
            await asyncio.sleep(0.05)
        assert not link.up
        meter.bill("acme", "requests", "fp32", 4)
        await meter.push()  # Redis is away: kept in memory
        await meter.flush()  # straight to SQL
        assert in_sql(store) == {("requests", "fp32"): 5}
        redis_server.start()
        for _ in range(100):
            if link.up:
                break
            await asyncio.sleep(0.05)
        meter.bill("acme", "requests", "fp32", 2)
        await meter.flush()
        assert in_sql(store) == {("requests", "fp32"): 7}
    finally:
        await link.close()


async def test_a_failed_sql_write_keeps_the_counts_for_the_next_flush(store, monkeypatch):
    link = RedisLink(f"redis://{closed_address()}/0", 0.2, 60)  # never up: memory -> SQL
    meter = Meter(link, store, push_seconds=60, flush_seconds=60)
    write = store.add_billable_usage

    def broken(rows: list[BillableRecord]) -> None:
        raise RuntimeError("the database is away")

    monkeypatch.setattr(store, "add_billable_usage", broken)
    meter.bill("acme", "embedding_tokens", "int8", 12)
    meter.add("acme", "key", requests=1)
    with pytest.raises(RuntimeError, match="database is away"):
        await meter.flush()
    assert in_sql(store) == {}
    # The usage table's write went through all the same.
    assert [row.counts["requests"] for row in store.get_usage("acme", "key", today(), today())] == [1]
    monkeypatch.setattr(store, "add_billable_usage", write)
    meter.bill("acme", "embedding_tokens", "int8", 3)
    await meter.flush()
    assert in_sql(store) == {("embedding_tokens", "int8"): 15}
    await link.close()


class EndedContext:
    """What Generation.budget reads of a call that ended: its status code and deadline."""

    def __init__(self, code: grpc.StatusCode, time_remaining: float | None) -> None:
        self._code, self._time_remaining = code, time_remaining

    def code(self) -> grpc.StatusCode:
        return self._code

    def time_remaining(self) -> float | None:
        return self._time_remaining


class NoLimits:
    async def reserve_tokens(self, *args) -> None:
        pass

    async def settle_tokens(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("code", "time_remaining", "bills"),
    [
        # Triton's call ran out of the caller's own deadline a moment before gRPC cancelled the
        # handler: the caller's doing, as a cancel is.
        (grpc.StatusCode.DEADLINE_EXCEEDED, -0.001, True),
        # No deadline from the caller: the gateway's own timeout ended it, a failure.
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, False),
        (grpc.StatusCode.INTERNAL, 5.0, False),
    ],
)
async def test_a_generation_ended_by_the_callers_deadline_is_billed_and_a_failed_one_is_not(
    store, code, time_remaining, bills
):
    link = RedisLink(f"redis://{closed_address()}/0", 0.2, 60)
    meter = Meter(link, store, push_seconds=60, flush_seconds=60)
    generation = Generation(routes=None, admission=NoLimits(), meter=meter)  # type: ignore[arg-type]
    caller = Caller("acme", Role.READER, "key")
    account = TokenAccount("hello", Sampling(max_tokens=8))
    with pytest.raises(grpc.aio.AbortError):
        async with generation.budget(caller, account, "int8", EndedContext(code, time_remaining)):
            account.completion_tokens = 3
            raise grpc.aio.AbortError()
    await meter.flush()
    expected = {("requests", "int8"): 1, ("input_tokens", "int8"): 5, ("output_tokens", "int8"): 3}
    assert in_sql(store) == (expected if bills else {})
    await link.close()
