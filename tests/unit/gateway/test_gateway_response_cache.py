"""The response cache's memory tier (ResponseCache with memory_bytes): a hit from memory makes no
Redis round trip, lives at most MEMORY_SECONDS, and the memory holds at most memory_bytes, the
least recently used answers leaving first. Against a real redis-server."""

from __future__ import annotations

import redis.asyncio as aioredis

from services.gateway.cache import MEMORY_SECONDS, ResponseCache
from services.gateway.redis_link import RedisLink


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def open_cache(redis_server, memory_bytes: int, clock: Clock | None = None) -> tuple[ResponseCache, RedisLink]:
    link = RedisLink(redis_server.url, 1.0, 1.0)
    await link.start()
    return ResponseCache(link, 300.0, 1024 * 1024, memory_bytes, clock or Clock()), link


async def test_a_hit_from_memory_needs_no_redis_and_expires(redis_server):
    clock = Clock()
    response_cache, link = await open_cache(redis_server, 1024 * 1024, clock)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        response_cache.put("maas:{t}:cache:a", b"answer")
        await response_cache.drain()
        assert await redis.get("maas:{t}:cache:a") == b"answer"
        # Gone from Redis, still answered from this process's memory.
        await redis.delete("maas:{t}:cache:a")
        assert await response_cache.get("maas:{t}:cache:a") == b"answer"
        # Past MEMORY_SECONDS the copy is dropped, and Redis has nothing.
        clock.now += MEMORY_SECONDS + 1
        assert await response_cache.get("maas:{t}:cache:a") is None
    finally:
        await redis.aclose()
        await link.close()


async def test_an_answer_read_from_redis_is_kept_in_memory(redis_server):
    response_cache, link = await open_cache(redis_server, 1024 * 1024)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        await redis.set("maas:{t}:cache:b", b"from another gateway")
        assert await response_cache.get("maas:{t}:cache:b") == b"from another gateway"
        await redis.delete("maas:{t}:cache:b")
        assert await response_cache.get("maas:{t}:cache:b") == b"from another gateway"
    finally:
        await redis.aclose()
        await link.close()


async def test_memory_holds_at_most_its_bytes_least_recently_used_out_first(redis_server):
    response_cache, link = await open_cache(redis_server, 8 * 100)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        for name in "abcdefgh":
            response_cache.put(f"maas:{{t}}:cache:{name}", name.encode() * 100)
        await response_cache.drain()
        await redis.flushdb()  # from here on only memory answers
        assert await response_cache.get("maas:{t}:cache:a") == b"a" * 100  # a is now the most recent
        response_cache.put("maas:{t}:cache:i", b"i" * 100)  # pushes out the least recent: b
        assert await response_cache.get("maas:{t}:cache:b") is None
        for name in "acdefghi":
            assert await response_cache.get(f"maas:{{t}}:cache:{name}") == name.encode() * 100
        # An answer above an eighth of the memory is never kept there.
        response_cache.put("maas:{t}:cache:big", b"x" * 101)
        await response_cache.drain()
        await redis.flushdb()
        assert await response_cache.get("maas:{t}:cache:big") is None
    finally:
        await redis.aclose()
        await link.close()


async def test_no_memory_means_every_lookup_goes_to_redis(redis_server):
    response_cache, link = await open_cache(redis_server, 0)
    redis = aioredis.Redis.from_url(redis_server.url)
    try:
        response_cache.put("maas:{t}:cache:c", b"answer")
        await response_cache.drain()
        await redis.delete("maas:{t}:cache:c")
        assert await response_cache.get("maas:{t}:cache:c") is None
    finally:
        await redis.aclose()
        await link.close()
