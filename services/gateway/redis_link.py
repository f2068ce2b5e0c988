"""The gateway's one Redis connection, and whether Redis is up right now.

Callers check `up` before a Redis call and report a failure with `lost()`: while Redis is down
nobody waits on it (the cache is bypassed, limits fall back to the in-process limiter) and a
background probe notices when it is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from prometheus_client import Gauge
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

REDIS_UP = Gauge("maas_gateway_redis_up", "1 while the gateway reaches Redis, 0 while it runs on fallbacks")

# What a Redis call raises when Redis is down or too slow: the signal to fall back.
REDIS_DOWN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisLink:
    def __init__(self, url: str, timeout_seconds: float, check_seconds: float) -> None:
        self.client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            health_check_interval=0,
            max_connections=256,
        )
        self.check_seconds = check_seconds
        self.up = False
        # Called with the new state on every change (health status, logs).
        self.on_change: Callable[[bool], Awaitable[None]] | None = None
        # Called when Redis is back: what was held in process while it was away goes back first.
        self.when_back: list[Callable[[], Awaitable[object]]] = []
        self._probe: asyncio.Task[None] | None = None
        self._notifications: set[asyncio.Task[None]] = set()
        REDIS_UP.set(0)

    async def start(self) -> None:
        await self._check()
        self._probe = asyncio.create_task(self._watch(), name="redis-probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.client.aclose()

    def lost(self, error: BaseException) -> None:
        """A Redis call failed: run on fallbacks until the probe reaches Redis again."""
        if self.up:
            self._set(False, str(error))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds)
            await self._check()

    async def _check(self) -> None:
        try:
            await self.client.ping()
        except REDIS_DOWN_ERRORS as error:
            if self.up:
                self._set(False, str(error))
            return
        if not self.up:
            self._set(True, "")

    def _set(self, up: bool, reason: str) -> None:
        self.up = up
        REDIS_UP.set(1 if up else 0)
        if up:
            log.info("redis reachable")
        else:
            log.warning("redis unreachable; cache bypassed, limits held in process", extra={"reason": reason})
        callbacks = [self.on_change(up)] if self.on_change is not None else []
        if up:
            callbacks += [callback() for callback in self.when_back]
        for callback in callbacks:
            task = asyncio.get_running_loop().create_task(callback)
            self._notifications.add(task)
            task.add_done_callback(self._notifications.discard)
