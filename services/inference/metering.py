"""Replica-seconds: the replicas a tenant's deployments hold READY, billed per replica-hour.

The leader (the process that drives the nodes) ticks every MAAS_INFERENCE_REPLICA_METER_SECONDS.
Each tick counts the replicas READY now, per deployment and price tier (a canary's replicas
under the canary version's tier), and adds count x the seconds since the previous tick to
replica_usage, split at UTC midnight. A replica that comes or goes between two ticks is counted
from or up to the nearer tick after it: at most one interval off, either way.

Exact across restarts and leader changes: only the time between two ticks of the same leader
counts. A process's first tick (after a start, or on winning leadership) only starts its clock,
and a stopping leader ticks once more before it lets go, so the time no leader watched is never
billed and no interval is counted by two processes. One interval counts for at most
MAX_INTERVAL_TICKS ticks' worth: a stalled loop or a suspended host bills no more than that.
The clock is read in whole seconds, so the intervals add up to the elapsed time exactly.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.exc import SQLAlchemyError

from services.common.validation import check_day_range
from services.inference.routes import Route, RouteTable
from services.inference.store import READY, ReplicaUsage, ReplicaUsageStore

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400
# The longest interval one tick counts, in ticks (at least 2 s: the clock reads whole seconds).
MAX_INTERVAL_TICKS = 2


def split_by_day(start: int, end: int) -> list[tuple[str, int]]:
    """The seconds of [start, end) (Unix seconds) on each UTC day, oldest first."""
    parts = []
    while start < end:
        day_end = (start // DAY_SECONDS + 1) * DAY_SECONDS
        part = min(end, day_end) - start
        parts.append((datetime.fromtimestamp(start, UTC).date().isoformat(), part))
        start += part
    return parts


def replica_tier(route: Route, triton_model: str, canary: bool) -> str:
    """The price tier of the revision a replica serves: the canary's, the serving one's, or
    (a roll's replica, READY a moment before the route switches to it) the latest row's."""
    if canary:
        revision = route.deployment.canary or route.canary
        return revision.tier if revision is not None else route.deployment.tier
    serving = route.serving
    return serving.tier if serving is not None and serving.triton_model == triton_model else route.deployment.tier


def held_replicas(routes: RouteTable) -> Counter[tuple[str, str, str]]:
    """READY replicas now, per (tenant, deployment name, tier)."""
    held: Counter[tuple[str, str, str]] = Counter()
    for route in routes.all():
        for replica in route.replicas.values():
            if replica.state == READY:
                tier = replica_tier(route, replica.triton_model, replica.canary)
                held[(route.deployment.tenant, route.deployment.name, tier)] += 1
    return held


class ReplicaMeter:
    """`leading` says whether this process leads now; `clock` gives Unix seconds."""

    def __init__(
        self,
        routes: RouteTable,
        store: ReplicaUsageStore,
        interval_seconds: float,
        *,
        leading: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = routes
        self.store = store
        self.leading = leading
        self.clock = clock
        self.max_interval = max(2, math.ceil(MAX_INTERVAL_TICKS * interval_seconds))
        self._last: int | None = None  # the second of this leadership's previous tick
        # Counted but not yet written (the database failed): (day, tenant, deployment, tier) -> seconds.
        self._pending: Counter[tuple[str, str, str, str]] = Counter()

    async def tick(self) -> None:
        """Count the replicas held since the previous tick, and write what is counted."""
        if not self.leading():
            self._last = None  # a later leadership starts its own clock
            return
        now = int(self.clock())
        if self._last is not None and now > self._last:
            start = max(self._last, now - self.max_interval)
            for (tenant, deployment, tier), replicas in held_replicas(self.routes).items():
                for day, seconds in split_by_day(start, now):
                    self._pending[(day, tenant, deployment, tier)] += replicas * seconds
        # A clock stepped back keeps the later second: no interval is counted twice.
        self._last = now if self._last is None else max(self._last, now)
        await self._write()

    async def close(self) -> None:
        """A stopping leader's last tick: its replicas were held up to now."""
        if self._last is not None:
            await self.tick()

    async def usage(self, tenant: str, start_day: str, end_day: str) -> list[ReplicaUsage]:
        """The tenant's replica-seconds per day, deployment and tier, for billing."""
        first, last = check_day_range(start_day, end_day)
        return await asyncio.to_thread(self.store.of_tenant, tenant, first.isoformat(), last.isoformat())

    async def _write(self) -> None:
        if not self._pending:
            return
        # Taken out before the write: a write that a cancelled tick leaves running in its
        # thread must not be written again by the next tick.
        counted, self._pending = self._pending, Counter()
        try:
            await asyncio.to_thread(self.store.add, [ReplicaUsage(*key, seconds) for key, seconds in counted.items()])
        except SQLAlchemyError as error:
            self._pending.update(counted)
            log.warning("replica-seconds not written; kept for the next tick", extra={"reason": str(error)[:300]})
