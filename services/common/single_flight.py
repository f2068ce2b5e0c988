"""One lookup for many concurrent misses of the same key. When a cached entry expires under load,
every caller in flight misses at once; without this each runs its own query (measured in the
gateway: a SQL lookup of the key and of the quota per concurrent caller, every cache period)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SingleFlight(Generic[V]):
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Task[V]] = {}

    async def run(self, key: Hashable, lookup: Callable[[], Awaitable[V]]) -> V:
        """`lookup()`'s result, shared with every caller that asks for `key` while it runs; its
        error reaches them all. A caller that is cancelled leaves the lookup to the others."""
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(lookup())
            self._running[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: Hashable, done: asyncio.Task[V]) -> None:
        if self._running.get(key) is done:
            del self._running[key]
