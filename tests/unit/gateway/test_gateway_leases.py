"""Leases (limits.Leases): a gateway process takes a few calls' worth of every limit a call
meets from Redis in one go and admits the next calls in memory. In memory with a fake clock,
then against a real redis-server: calls admitted from a lease touch no Redis key, unused units
go back, and no limit is ever passed, also with two gateway processes sharing one Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from services.gateway.limits import (
    LEASE_SECONDS,
    LEASE_UNITS,
    Bucket,
    Counter,
    Gate,
    Leases,
    Limiter,
)
from services.gateway.redis_link import RedisLink
from services.gateway.store import QuotaRecord, RateLimit
from services.gateway.usage import usage_key

USAGE = usage_key("2024-05-01", "t", "k")


def counter(limit: int, key: str = "maas:{t}:q") -> Counter:
    return Counter(key, limit, 1, 60, time.time() + 60, "requests per day of tenant t", "tenant:t")


def bucket(rate: float, burst: float, key: str = "maas:{t}:rl") -> Bucket:
    return Bucket(key, rate, burst, 1, "requests per second of tenant t", "tenant:t")


# A limit set no call in these tests comes near: every call to Redis may take a full lease.
ROOMY = (bucket(1e6, 1e6), counter(10**9))


@pytest.fixture
async def redis(redis_server):
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def make_limiter(redis_server):
    """Limiters each with its own Redis connection, as separate gateway processes have."""
    links: list[RedisLink] = []

    async def make(count_leased=None) -> Limiter:
        link = RedisLink(redis_server.url, 1.0, 1.0)
        await link.start()
        links.append(link)
        return Limiter(link, count_leased=count_leased)

    yield make
    for link in links:
        await link.close()


async def reserve(limiter: Limiter, limits: tuple[Bucket | Counter, ...]) -> bool:
    """One read-only call (lease allowed) against `limits`; whether it was admitted."""
    buckets = [limit for limit in limits if isinstance(limit, Bucket)]
    counters = [limit for limit in limits if isinstance(limit, Counter)]
    return await limiter.reserve(buckets, counters, USAGE, lease=True) is None


async def used(redis: aioredis.Redis, key: str = "maas:{t}:q") -> int:
    return int(await redis.get(key) or 0)


# --- Leases in memory ---


def test_a_lease_admits_exactly_its_units_for_its_own_limits():
    leases = Leases(clock=lambda: 100.0)
    limits, other = (counter(1000),), (counter(1000, key="maas:{t}:other"),)
    assert not leases.take(limits)  # no lease yet
    leases.granted(limits, 3)
    assert [leases.take(limits) for _ in range(4)] == [True, True, True, False]
    assert not leases.take(other)


def test_an_expired_lease_is_not_taken_and_gives_back_what_it_did_not_use():
    now = [100.0]
    leases = Leases(clock=lambda: now[0])
    limits, spent = (counter(1000),), (counter(1000, key="maas:{t}:spent"),)
    leases.granted(limits, 5)
    leases.granted(spent, 1)
    assert leases.take(limits) and leases.take(limits) and leases.take(spent)
    assert leases.expired(now[0]) == []  # still live: kept
    now[0] += LEASE_SECONDS
    assert not leases.take(limits)
    # Both leave; only the one with units left has something to give back.
    assert leases.expired(now[0]) == [(limits, 3)]
    assert leases.expired(float("inf")) == []


def test_one_lease_asked_per_limit_set_at_a_time():
    leases = Leases()
    limits, other = (counter(1000),), (counter(1000, key="maas:{t}:other"),)
    assert leases.ask(limits) == LEASE_UNITS
    assert leases.ask(limits) == 0  # a concurrent call goes to Redis without asking
    assert leases.ask(other) == LEASE_UNITS
    leases.asked(limits)
    assert leases.ask(limits) == LEASE_UNITS


# --- Leases against Redis ---


async def test_calls_from_a_lease_do_not_touch_redis_and_unused_units_go_back(make_limiter, redis):
    leased: list[str] = []
    limiter = await make_limiter(count_leased=leased.append)
    assert await reserve(limiter, ROOMY)
    assert await used(redis) == 1 + LEASE_UNITS  # the call and its lease
    for _ in range(LEASE_UNITS):
        assert await reserve(limiter, ROOMY)
    assert await used(redis) == 1 + LEASE_UNITS
    # Leased calls are counted in memory (the Meter), only the first by the script.
    assert leased == [USAGE] * LEASE_UNITS
    assert await redis.hget(USAGE, "requests") == "1"
    # The lease is used up: the next call goes to Redis and takes another.
    assert await reserve(limiter, ROOMY)
    assert await used(redis) == 2 + 2 * LEASE_UNITS
    for _ in range(5):
        assert await reserve(limiter, ROOMY)
    await limiter.close()
    assert await used(redis) == 2 + LEASE_UNITS + 5  # exactly the calls admitted


async def test_concurrent_calls_take_one_lease(make_limiter, redis):
    limiter = await make_limiter()
    assert all(await asyncio.gather(*(reserve(limiter, ROOMY) for _ in range(8))))
    assert await used(redis) == 8 + LEASE_UNITS
    await limiter.give_back(limiter.leases.expired(float("inf")))
    assert await used(redis) == 8


async def test_the_background_task_returns_expired_leases(make_limiter, redis):
    limiter = await make_limiter()
    limiter.start()
    try:
        for _ in range(3):
            assert await reserve(limiter, ROOMY)
        assert await used(redis) == 1 + LEASE_UNITS
        # Returned within LEASE_SECONDS and one check interval after the grant.
        deadline = time.monotonic() + 2 * LEASE_SECONDS + 1
        while await used(redis) != 3:
            assert time.monotonic() < deadline, "the unused units did not go back"
            await asyncio.sleep(0.05)
    finally:
        await limiter.close()
    assert await used(redis) == 3


async def test_a_binding_limit_gets_no_lease_and_stays_exact_across_two_gateways(make_limiter, redis):
    # 99 left after the first call: less than LEASE_MIN * LEASE_HEADROOM, so never a lease.
    limits = (counter(100),)
    first, second = await make_limiter(), await make_limiter()
    calls = [reserve((first, second)[i % 2], limits) for i in range(150)]
    assert sum(await asyncio.gather(*calls)) == 100
    assert await used(redis) == 100
    assert first.leases.expired(float("inf")) == second.leases.expired(float("inf")) == []


async def test_a_nearly_empty_bucket_gets_no_lease_and_stays_exact_across_two_gateways(make_limiter, redis):
    limits = (bucket(0.001, 100),)
    first, second = await make_limiter(), await make_limiter()
    calls = [reserve((first, second)[i % 2], limits) for i in range(150)]
    assert sum(await asyncio.gather(*calls)) == 100
    assert 0 <= float(await redis.hget(limits[0].key, "tokens")) < 1
    assert first.leases.expired(float("inf")) == second.leases.expired(float("inf")) == []


async def test_leases_never_pass_a_limit(make_limiter, redis):
    limit = 64 * 40  # leases while plenty is left, none as the limit nears
    limits = (counter(limit),)
    leased: list[str] = []
    gateways = [await make_limiter(count_leased=leased.append) for _ in range(2)]
    admitted, denied = 0, [False, False]
    while not all(denied):
        for i, limiter in enumerate(gateways):
            if not denied[i]:
                if await reserve(limiter, limits):
                    admitted += 1
                else:
                    denied[i] = True
    assert leased, "no call came from a lease"
    assert await used(redis) == limit
    # What both still hold (at most one lease each, expired unused) is all that is missing.
    held = [limiter.leases.expired(float("inf")) for limiter in gateways]
    unused = sum(units for leases in held for _, units in leases)
    assert admitted + unused == limit and admitted >= limit - 2 * LEASE_UNITS
    for limiter, leases in zip(gateways, held, strict=True):
        await limiter.give_back(leases)
    assert await used(redis) == admitted
    # Given back, those units are admitted again, up to the limit exactly.
    while await reserve(gateways[0], limits):
        admitted += 1
    assert admitted == limit


async def test_a_bucket_lease_takes_tokens_and_gives_back_up_to_the_burst(make_limiter, redis):
    # Refills a thousandth of a token per second: the tokens field moves only with the calls.
    limits = (bucket(0.001, 10_000),)
    limiter = await make_limiter()
    assert await reserve(limiter, limits)
    assert float(await redis.hget(limits[0].key, "tokens")) == 10_000 - 1 - LEASE_UNITS
    for _ in range(3):
        assert await reserve(limiter, limits)
    await limiter.give_back(limiter.leases.expired(float("inf")))
    assert float(await redis.hget(limits[0].key, "tokens")) == pytest.approx(10_000 - 4, abs=0.01)
    # A refund never fills a bucket past its burst.
    assert await reserve(limiter, limits)
    await redis.hset(limits[0].key, "tokens", 10_000 - 10)
    await limiter.give_back(limiter.leases.expired(float("inf")))
    assert float(await redis.hget(limits[0].key, "tokens")) == 10_000


async def test_the_gate_leases_reads_but_never_a_call_that_reserves_tokens(make_limiter, redis):
    gate = Gate(await make_limiter(), RateLimit())
    quota = QuotaRecord("t", requests_per_day=10**6, tokens_per_day=10**6)
    requests = f"maas:{{t}}:q:requests:{gate.periods().day}"
    await gate.admit("t", "k", None, quota, lease=True)
    await gate.admit("t", "k", None, quota, lease=True)
    assert await used(redis, requests) == 1 + LEASE_UNITS
    # With tokens the limit set differs and holds no lease: both counters move in Redis.
    await gate.admit("t", "k", None, quota, tokens=10, lease=True)
    assert await used(redis, requests) == 2 + LEASE_UNITS
    assert await used(redis, f"maas:{{t}}:q:tokens:{gate.periods().day}") == 10
    await gate.admit("t", "k", None, quota, lease=False)
    assert await used(redis, requests) == 3 + LEASE_UNITS


async def test_a_text_call_reserves_its_tokens_from_a_lease_where_no_token_limit_is_near(make_limiter, redis):
    gate = Gate(await make_limiter(), RateLimit(0, 0, tokens_per_minute=10**9))
    quota = QuotaRecord("t", tokens_per_day=10**9)
    day = f"maas:{{t}}:q:tokens:{gate.periods().day}"
    # The first reservation goes to Redis and takes a lease of LEASE_UNITS calls of 100 tokens.
    await gate.reserve_tokens("t", "k", None, quota, 100)
    assert await used(redis, day) == 100 * (1 + LEASE_UNITS)
    # The next ones, even of another size, come from it: Redis does not move.
    await gate.reserve_tokens("t", "k", None, quota, 100)
    await gate.reserve_tokens("t", "k", None, quota, 250)
    assert await used(redis, day) == 100 * (1 + LEASE_UNITS)
    # Settling goes straight to Redis; the unused lease goes back: what remains is what was used.
    await gate.settle_tokens("t", "k", None, quota, reserved=450, used=120)
    await gate.limiter.close()
    assert await used(redis, day) == 120
