"""Quotas across Redis faults, with a real redis-server and two gateway processes' worth of
limiters sharing it: a frozen Redis (SIGSTOP) and a killed one (kill -9, restarted on the same
directory, with and without its append-only file). Each gateway admits at most its lease while
Redis is away, writes back what it admitted when Redis returns, and the quota holds throughout.

Before this change the same scenario (quota 100, 60 spent) admitted 100 and more: each gateway
carried on from the last value it saw without any share, nothing it admitted reached Redis, and
a Redis restarted without its last writes started over from what it had kept."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis

from services.gateway.limits import Gate, Limiter, LocalLimiter, RateLimited
from services.gateway.redis_link import RedisLink
from services.gateway.store import QuotaRecord, RateLimit
from services.gateway.usage import usage_key

QUOTA = QuotaRecord("acme", requests_per_day=100)
TIMEOUT = 0.25


class PersistentRedis:
    """redis-server on a free port and a data directory it keeps across kill -9 and restart."""

    def __init__(self, directory: Path, appendonly: bool) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.appendonly = appendonly
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=self.port, socket_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def get(self, key: str) -> int:
        return int(redis.Redis(port=self.port).get(key) or 0)

    def usage(self, key_id: str) -> int:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return int(redis.Redis(port=self.port).hget(usage_key(day, "acme", key_id), "requests") or 0)


@pytest.fixture
def redis_dir(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not on PATH (CI must provide it)")
        pytest.skip("redis-server is not on PATH")
    return tmp_path


class Gateway:
    """One gateway process's limiter: its own link to Redis and its own in-process state."""

    def __init__(self, url: str, name: str, share: float) -> None:
        self.name = name
        self.link = RedisLink(url, TIMEOUT, 0.1)
        self.gate = Gate(Limiter(self.link, LocalLimiter(share=share, retry_seconds=0.1)), RateLimit())
        self.admitted = 0

    async def call(self) -> bool:
        try:
            await self.gate.admit("acme", self.name, None, QUOTA)
        except RateLimited:
            return False
        self.admitted += 1
        return True


async def until(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def counter_key() -> str:
    return f"maas:{{acme}}:q:requests:{time.strftime('%Y-%m-%d', time.gmtime())}"


async def spend(gateways: list[Gateway], calls: int) -> None:
    for index in range(calls):
        assert await gateways[index % len(gateways)].call()


async def test_frozen_redis_admits_at_most_each_lease_then_the_counter_is_repaired(redis_dir):
    server = PersistentRedis(redis_dir, appendonly=True)
    server.start()
    one, two = Gateway(server.url, "k1", 0.5), Gateway(server.url, "k2", 0.5)
    try:
        for gateway in (one, two):
            await gateway.link.start()
        await spend([one, two], 60)
        server.signal(signal.SIGSTOP)
        started = time.monotonic()
        stalled = [await one.call() for _ in range(60)] + [await two.call() for _ in range(60)]
        # No call waits on a frozen Redis much past its timeout: it counts as down after it.
        assert time.monotonic() - started < 120 * 0.05 + 4 * TIMEOUT
        assert not one.link.up and not two.link.up
        # Each saw 59 or 60 of 100: half of the remaining 40 or 41 each, at most.
        assert one.admitted - 30 <= 20 and two.admitted - 30 <= 20
        assert sum(stalled) >= 30  # the leases were used, not refused
        server.signal(signal.SIGCONT)
        await until(lambda: one.link.up and two.link.up)
        await until(lambda: not one.gate.limiter.local.pending and not two.gate.limiter.local.pending)
        total = one.admitted + two.admitted
        # Redis knows of everything admitted; a call that timed out but ran once Redis thawed
        # is counted as well (one per gateway at most): never less than admitted.
        assert total <= server.get(counter_key()) <= total + 2
        while await one.call() or await two.call():
            pass
        assert one.admitted + two.admitted <= 100
        assert server.usage("k1") + server.usage("k2") >= one.admitted + two.admitted
    finally:
        server.signal(signal.SIGCONT)
        for gateway in (one, two):
            await gateway.link.close()
        server.kill()


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
async def test_killed_redis_restarted_keeps_the_quota_and_gets_its_counter_back(redis_dir, appendonly):
    server = PersistentRedis(redis_dir, appendonly=appendonly)
    server.start()
    one, two = Gateway(server.url, "k1", 0.5), Gateway(server.url, "k2", 0.5)
    try:
        for gateway in (one, two):
            await gateway.link.start()
        await spend([one, two], 60)
        server.kill()
        await until(lambda: not one.link.up and not two.link.up)
        for _ in range(40):
            await one.call()
            await two.call()
        assert one.admitted - 30 <= 20 and two.admitted - 30 <= 20
        server.start()
        await until(lambda: one.link.up and two.link.up)
        await until(lambda: not one.gate.limiter.local.pending and not two.gate.limiter.local.pending)
        # Restarted without the lost writes (or all of them), the counter is repaired.
        assert server.get(counter_key()) == one.admitted + two.admitted
        while await one.call() or await two.call():
            pass
        assert one.admitted + two.admitted <= 100
        assert server.get(counter_key()) == one.admitted + two.admitted
    finally:
        for gateway in (one, two):
            await gateway.link.close()
        server.kill()


async def test_refuse_policy_and_unseen_counters_admit_nothing_while_redis_is_down(redis_dir):
    server = PersistentRedis(redis_dir, appendonly=False)
    server.start()
    link = RedisLink(server.url, TIMEOUT, 0.1)
    gate = Gate(Limiter(link, LocalLimiter(share=1.0)), RateLimit())
    try:
        await link.start()
        await gate.admit("acme", "k1", None, QUOTA)
        server.kill()
        await until(lambda: not link.up)
        # Another tenant's counter was never seen from Redis: it may be anywhere up to its limit.
        with pytest.raises(RateLimited, match="cannot be checked while the quota store"):
            await gate.admit("other", "k1", None, QuotaRecord("other", requests_per_day=100))
        await gate.admit("acme", "k1", None, QUOTA)
    finally:
        await link.close()
        server.kill()
