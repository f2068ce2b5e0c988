"""Rate limits and quotas through the real gateway against a real redis-server: exact budgets
under concurrency, also across two gateways sharing one Redis; the google.rpc details and
x-ratelimit trailers; the in-process fallback while Redis is down, and the recovery."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from maas.common.v1 import common_pb2
from maas.gateway.v1 import admin_pb2
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from prometheus_client import REGISTRY

from services.common.server import running
from services.gateway.limits import Bucket, Counter, Gate, Limiter, LocalLimiter, RedisDownPolicy
from services.gateway.redis_link import REDIS_UP, RedisLink
from services.gateway.server import create_app
from services.gateway.store import QuotaRecord, RateLimit
from tests.unit.gateway.gateway_fakes import gateway_stack


@pytest.fixture
async def stack(tmp_path, redis_server):
    async with gateway_stack(tmp_path, redis_url=redis_server.url, redis_check_seconds=0.1) as started:
        await started.wait_for_routes()
        yield started


@contextlib.asynccontextmanager
async def second_gateway(stack):
    """Another gateway process's worth: its own app on the same database and Redis."""
    app = await create_app(stack.settings)
    async with running(app) as server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


def predict_request(
    values: np.ndarray | None = None, deployment: str = "mlp"
) -> inference_pb2.PredictRequest:
    values = np.zeros((1, 4), np.float32) if values is None else values
    tensor = common_pb2.Tensor(
        name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=values.shape, raw=values.tobytes()
    )
    return inference_pb2.PredictRequest(deployment=deployment, inputs=[tensor])


async def outcomes(channels, metadata, calls: int) -> list[grpc.aio.AioRpcError | None]:
    """`calls` concurrent Predicts spread over the channels: None for OK, else the error."""

    async def one(index: int) -> grpc.aio.AioRpcError | None:
        stub = inference_pb2_grpc.InferenceServiceStub(channels[index % len(channels)])
        try:
            await stub.Predict(predict_request(), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    return await asyncio.gather(*(one(i) for i in range(calls)))


async def set_key_limit(stack, who: str, rps: float, burst: int) -> None:
    await stack.admin.SetApiKeyRateLimit(
        admin_pb2.SetApiKeyRateLimitRequest(
            id=stack.key_ids[who], rate_limit=admin_pb2.RateLimit(requests_per_second=rps, burst=burst)
        ),
        metadata=stack.auth("admin-of-admin"),
    )


async def set_quota(stack, tenant: str, **fields) -> admin_pb2.Quota:
    rate = fields.pop("rate_limit", None)
    quota = admin_pb2.Quota(tenant=tenant, **fields)
    if rate is not None:
        quota.rate_limit.CopyFrom(rate)
    response = await stack.admin.SetQuota(
        admin_pb2.SetQuotaRequest(quota=quota), metadata=stack.auth("admin-of-admin")
    )
    return response.quota


async def redis_health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(service="redis"))).status


async def eventually(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_key_burst_admits_exactly_the_budget_across_two_gateways(stack):
    # A bucket that barely refills: exactly `burst` calls may pass, however they are spread.
    await set_key_limit(stack, "reader", rps=0.01, burst=10)
    async with second_gateway(stack) as other:
        results = await outcomes([stack.channel, other], stack.auth("reader"), 40)
    refused = [r for r in results if r is not None]
    assert len(results) - len(refused) == 10
    assert {r.code() for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}

    status = rpc_status.from_call(refused[0])
    retry, failure = error_details_pb2.RetryInfo(), error_details_pb2.QuotaFailure()
    assert status.details[0].Unpack(retry) and status.details[1].Unpack(failure)
    assert retry.retry_delay.seconds > 0
    assert failure.violations[0].subject == f"key:{stack.key_ids['reader']}"
    trailers = dict(refused[0].trailing_metadata())
    assert trailers["x-ratelimit-limit"] == "10"
    assert trailers["x-ratelimit-remaining"] == "0"
    assert int(trailers["x-ratelimit-reset"]) > 0
    # Other keys of the tenant are not affected by this key's limit.
    assert await outcomes([stack.channel], stack.auth("developer"), 3) == [None] * 3


async def test_daily_request_quota_has_no_overshoot_under_concurrency(stack):
    quota = await set_quota(stack, "acme", requests_per_day=15)
    assert quota.requests_per_day == 15 and quota.update_time.seconds > 0
    got = await stack.admin.GetQuota(
        admin_pb2.GetQuotaRequest(tenant="acme"), metadata=stack.auth("admin-of-admin")
    )
    assert got.quota.requests_per_day == 15
    async with second_gateway(stack) as other:
        results = await outcomes([stack.channel, other], stack.auth("reader"), 24)
        results += await outcomes([other], stack.auth("developer"), 6)
    assert sum(r is None for r in results) == 15
    refused = [r for r in results if r is not None]
    assert all(r.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "requests per day of tenant acme" in refused[0].details()
    # What the "quota near exhaustion" alert reads: the budget is all used.
    labels = {"tenant": "acme", "resource": "requests", "period": "day"}
    assert REGISTRY.get_sample_value("maas_gateway_quota_used_ratio", labels) == 1.0
    # The other tenant has its own budget; admin calls are never limited.
    other_tenant = inference_pb2_grpc.InferenceServiceStub(stack.channel)
    await other_tenant.Predict(predict_request(deployment="secret"), metadata=stack.auth("other"))
    await stack.admin.WhoAmI(admin_pb2.WhoAmIRequest(), metadata=stack.auth("admin"))


async def test_tenant_rate_limit_is_shared_by_its_keys(stack):
    await set_quota(stack, "acme", rate_limit=admin_pb2.RateLimit(requests_per_second=0.01, burst=6))
    results = await outcomes([stack.channel], stack.auth("reader"), 4)
    results += await outcomes([stack.channel], stack.auth("developer"), 4)
    assert sum(r is None for r in results) == 6


async def test_invalid_limits_are_refused(stack):
    root = stack.auth("admin-of-admin")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.SetQuota(
            admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(tenant="nobody")), metadata=root
        )
    assert error.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.admin.SetApiKeyRateLimit(
            admin_pb2.SetApiKeyRateLimitRequest(
                id=stack.key_ids["reader"], rate_limit=admin_pb2.RateLimit(requests_per_second=-1)
            ),
            metadata=root,
        )
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    for bad in (
        stack.admin.SetQuota(
            admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(tenant="acme", requests_per_day=2**64 - 1)),
            metadata=root,
        ),
        stack.admin.ListAuditEvents(
            admin_pb2.ListAuditEventsRequest(start_time={"seconds": -(10**13)}), metadata=root
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await bad
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    # Clearing a key's limit: the default (unlimited here) applies again.
    await set_key_limit(stack, "reader", rps=0.01, burst=1)
    cleared = await stack.admin.SetApiKeyRateLimit(
        admin_pb2.SetApiKeyRateLimitRequest(id=stack.key_ids["reader"]), metadata=root
    )
    assert not cleared.api_key.HasField("rate_limit")
    assert await outcomes([stack.channel], stack.auth("reader"), 3) == [None] * 3


async def test_training_jobs_are_refused_once_training_minutes_are_used_up(stack, redis_server):
    await set_quota(stack, "acme", training_minutes_per_day=1)
    trainer = trainer_pb2_grpc.TrainerServiceStub(stack.channel)
    request = trainer_pb2.CreateTrainingJobRequest()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await trainer.CreateTrainingJob(request, metadata=stack.auth("developer"))
    # Within budget the call is forwarded (and this test's trainer is not running).
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    # What the trainer would report after a job ran a minute (see Gate.settle_training).
    link = RedisLink(redis_server.url, 1.0, 1.0)
    await link.start()
    gate = Gate(Limiter(link), RateLimit())
    await gate.settle_training("acme", QuotaRecord("acme", training_minutes_per_day=1), 60)
    await link.close()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await trainer.CreateTrainingJob(request, metadata=stack.auth("developer"))
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "training seconds per day" in error.value.details()


async def test_redis_down_keeps_serving_with_local_limits_and_recovers(stack, redis_server):
    assert await redis_health(stack.channel) == health_pb2.HealthCheckResponse.SERVING
    redis_server.kill()
    await set_key_limit(stack, "reader", rps=0.01, burst=5)

    async def redis_not_serving() -> bool:
        return await redis_health(stack.channel) == health_pb2.HealthCheckResponse.NOT_SERVING

    await eventually(redis_not_serving)
    assert REDIS_UP._value.get() == 0
    # Still serving, the limit held in process.
    results = await outcomes([stack.channel], stack.auth("reader"), 12)
    assert sum(r is None for r in results) == 5
    assert await outcomes([stack.channel], stack.auth("developer"), 2) == [None] * 2

    redis_server.start()

    async def redis_serving() -> bool:
        return await redis_health(stack.channel) == health_pb2.HealthCheckResponse.SERVING

    await eventually(redis_serving)
    assert REDIS_UP._value.get() == 1
    # Redis holds the limits again: a fresh Redis has a full bucket for this key.
    results = await outcomes([stack.channel], stack.auth("reader"), 8)
    assert sum(r is None for r in results) == 5


async def test_token_reservations_and_settlement(redis_server):
    """Text generation arrives later; the primitive: reserve N tokens, settle what was used."""
    link = RedisLink(redis_server.url, 1.0, 1.0)
    await link.start()
    try:
        gate = Gate(Limiter(link), RateLimit(tokens_per_minute=1000))
        quota = QuotaRecord("acme", tokens_per_day=500)
        await gate.admit("acme", "k1", None, quota, tokens=300)
        with pytest.raises(Exception, match="tokens per day of tenant acme"):
            await gate.admit("acme", "k1", None, quota, tokens=300)
        # Only 100 of the 300 reserved were generated: 400 are left for today, and 900 of this
        # minute's 1000 (without the refund, 700).
        await gate.settle_tokens("acme", "k1", None, quota, reserved=300, used=100)
        await gate.admit("acme", "k1", None, quota, tokens=350)
        with pytest.raises(Exception, match="tokens per minute of API key k1"):
            await gate.admit("acme", "k1", None, QuotaRecord("acme"), tokens=700)
        await gate.settle_tokens("acme", "k1", None, quota, reserved=350, used=0)
        await gate.admit("acme", "k1", None, QuotaRecord("acme"), tokens=850)
    finally:
        await link.close()


def test_local_refund_gives_back_up_to_the_burst():
    limiter = LocalLimiter(clock=lambda: 1000.0)
    bucket = Bucket("tpm", rate=1.0, burst=100, cost=80, what="tokens per minute of x", subject="key:x")
    assert limiter.reserve([bucket], []) is None
    assert limiter.reserve([bucket], []) is not None  # 20 left
    limiter.refund([Bucket("tpm", 1.0, 100, 70, "w", "s")])
    assert limiter.reserve([bucket], []) is None  # 90 were there
    limiter.refund([Bucket("tpm", 1.0, 100, 500, "w", "s")])
    assert limiter.reserve([bucket], []) is None and limiter.reserve([bucket], []) is not None  # capped at 100


def test_local_limiter_follows_the_same_rules():
    now = [1000.0]
    limiter = LocalLimiter(clock=lambda: now[0])
    bucket = Bucket("b", rate=2.0, burst=3, cost=1, what="requests per second of x", subject="key:x")
    counter = Counter(
        "c", limit=4, cost=1, ttl_seconds=60, reset_at=1060.0, what="requests per day", subject="t"
    )
    limiter.seen("c", 0, 60)  # a counter never seen from Redis is refused (see the lease tests)
    assert [limiter.reserve([bucket], [counter]) for _ in range(3)] == [None] * 3
    denial = limiter.reserve([bucket], [counter])
    assert denial is not None and denial.limit is bucket and denial.retry_after_seconds == pytest.approx(0.5)
    now[0] += 0.5  # one token back
    assert limiter.reserve([bucket], [counter]) is None
    now[0] += 10
    denial = limiter.reserve([bucket], [counter])
    # While Redis is away the answer is "retry soon": Redis may be back with more budget.
    assert denial is not None and denial.limit is counter and denial.retry_after_seconds == pytest.approx(1.0)
    # The counter carries on from what Redis last reported.
    limiter.seen("d", 9, 60)
    assert limiter.reserve([], [Counter("d", 10, 1, 60, 1060.0, "x", "t")]) is None
    assert limiter.reserve([], [Counter("d", 10, 1, 60, 1060.0, "x", "t")]) is not None


async def test_script_and_fallback_agree(redis_server):
    """The same reservations give the same answers in Redis and in process."""
    link = RedisLink(redis_server.url, 1.0, 1.0)
    await link.start()
    try:
        limiter = Limiter(link)
        bucket = Bucket("maas:{t}:b", rate=0.001, burst=3, cost=1, what="w", subject="s")
        counter = Counter(
            "maas:{t}:c", limit=5, cost=2, ttl_seconds=60, reset_at=time.time() + 60, what="w", subject="s"
        )
        local = LocalLimiter()
        local.seen(counter.key, 0, 60)
        remote = [await limiter.reserve([bucket], [counter]) is None for _ in range(4)]
        in_process = [local.reserve([bucket], [counter]) is None for _ in range(4)]
        assert remote == in_process == [True, True, False, False]
        client = aioredis.Redis.from_url(redis_server.url)
        assert int(await client.get("maas:{t}:c")) == 4
        await client.aclose()
    finally:
        await link.close()


def _day_counter(limit: int = 100, cost: int = 1) -> Counter:
    return Counter("q", limit, cost, 60, 1060.0, "requests per day of tenant t", "tenant:t")


def test_local_lease_is_a_share_of_what_was_left_and_is_written_back():
    limiter = LocalLimiter(clock=lambda: 1000.0, share=0.5)
    limiter.seen("q", 60, 60)
    results = [limiter.reserve([], [_day_counter()]) is None for _ in range(30)]
    assert sum(results) == 20  # half of the 40 left
    denial = limiter.reserve([], [_day_counter()])
    assert denial is not None and "share of it (20) is used up" in (denial.reason or "")
    assert limiter.pending
    counters, _ = limiter.unwritten()
    assert counters == [("q", 20, 60, 60)]  # delta, what Redis last said, ttl
    limiter.written(counters, [85])
    assert not limiter.pending and limiter.used("q") == 85


def test_local_refuses_unseen_counters_and_under_the_refuse_policy():
    assert LocalLimiter(clock=lambda: 1000.0).reserve([], [_day_counter()]) is not None
    limiter = LocalLimiter(clock=lambda: 1000.0, policy=RedisDownPolicy.REFUSE)
    limiter.seen("q", 0, 60)
    denial = limiter.reserve([], [_day_counter()])
    assert denial is not None and "cannot be checked" in denial.reason
    # Rate-limit buckets alone still run in process.
    assert limiter.reserve([Bucket("b", 1.0, 2, 1, "w", "s")], []) is None


def test_local_seen_counter_expires_with_its_ttl():
    now = [1000.0]
    limiter = LocalLimiter(clock=lambda: now[0])
    limiter.seen("q", 10, 60)
    assert limiter.reserve([], [_day_counter()]) is None
    now[0] += 61  # what Redis said is too old to lease from
    assert limiter.reserve([], [_day_counter()]) is not None


def test_usage_and_settlements_while_down_wait_for_the_write_back():
    limiter = LocalLimiter(clock=lambda: 1000.0)
    limiter.count("usage:k", "requests")
    limiter.count("usage:k", "requests")
    limiter.adjust([("tokens", 120, 60)])  # used, so written back even past any lease
    counters, usage = limiter.unwritten()
    assert counters == [("tokens", 120, 0, 60)] and usage == {"usage:k": {"requests": 2}}
    limiter.restore(usage)  # the write failed: kept for the next one
    assert limiter.unwritten()[1] == {"usage:k": {"requests": 2}}


async def test_write_back_repairs_a_counter_redis_lost(redis_server):
    link = RedisLink(redis_server.url, 1.0, 1.0)
    await link.start()
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        limiter = Limiter(link, LocalLimiter(share=1.0))
        limiter.local.seen("maas:{t}:q", 60, 60)
        assert limiter.local.reserve([], [Counter("maas:{t}:q", 100, 1, 60, time.time() + 60, "w", "s")]) is None
        await client.set("maas:{t}:q", 3)  # Redis came back without most of its writes
        assert await limiter.write_back()
        assert int(await client.get("maas:{t}:q")) == 61
    finally:
        await client.aclose()
        await link.close()


async def test_a_keys_request_plan_is_built_once_and_rebuilt_when_its_limits_or_the_day_change(monkeypatch):
    """Gate.admit reuses what one request of a key is reserved against while the key's limit,
    its tenant's quota (the cached objects) and the day are the same ones."""
    seen: list[tuple[list[Bucket], list[Counter], str]] = []

    class Recording:
        async def reserve(self, buckets, counters, usage="", lease=False):
            seen.append((buckets, counters, usage))

    gate = Gate(Recording(), RateLimit(requests_per_second=5))  # type: ignore[arg-type]
    limit, quota = RateLimit(requests_per_second=5), QuotaRecord("acme", requests_per_day=100)
    await gate.admit("acme", "k1", limit, quota)
    await gate.admit("acme", "k1", limit, quota)
    assert seen[0][0] is seen[1][0] and seen[0][1] is seen[1][1]
    await gate.admit("acme", "k2", limit, quota)  # another key: its own buckets
    assert seen[2][0][0].key == "maas:{acme}:rl:key:k2" and seen[2][2] != seen[1][2]
    tighter = QuotaRecord("acme", requests_per_day=10)  # SetQuota: a new record from the cache
    await gate.admit("acme", "k1", limit, tighter)
    assert seen[3][1][0].limit == 10
    slower = RateLimit(requests_per_second=1)
    await gate.admit("acme", "k1", slower, tighter)
    assert seen[4][0][0].rate == 1
    await gate.admit("acme", "k1", slower, tighter, tokens=7)  # a text call: its token limits added
    assert seen[5][0][0].rate == 1 and len(seen[4][0]) == 1 and seen[4][0] is not seen[5][0]
    tomorrow = time.time() + 86400
    monkeypatch.setattr(time, "time", lambda: tomorrow)
    await gate.admit("acme", "k1", slower, tighter)
    assert seen[6][2] != seen[4][2] and seen[6][1][0].key != seen[4][1][0].key
