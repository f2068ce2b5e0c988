"""The autoscaler's decisions in the audit log. The inference service decides; the gateway keeps
the audit log. Each decision reaches every gateway process on the route stream (again after a
reconnect), so the first process to claim it in Redis writes its row, and the others skip it."""

from __future__ import annotations

import asyncio
import logging

from maas.inference.v1 import inference_pb2

from services.gateway.audit import AuditLog
from services.gateway.redis_link import REDIS_DOWN_ERRORS, RedisLink

log = logging.getLogger(__name__)

# Who the row names as the caller, and the method it records.
AUTOSCALER = "autoscaler"
METHOD = "/maas.inference.v1.InferenceService/Autoscale"
# How long a claim is kept: longer than any gateway stays away from the route stream.
CLAIM_SECONDS = 7 * 24 * 3600


class ScalingAudit:
    def __init__(self, audit: AuditLog, link: RedisLink) -> None:
        self.audit = audit
        self.link = link
        self._tasks: set[asyncio.Task[None]] = set()

    def heard(self, route: inference_pb2.Route) -> None:
        """A route arrived with a scaling decision this process has not seen (RouteTable)."""
        task = asyncio.get_running_loop().create_task(self._record(route.tenant, route.deployment, route.last_scaling_event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, tenant: str, deployment: str, event: inference_pb2.ScalingEvent) -> None:
        if not await self._claim(f"maas:{{{tenant}}}:audit:scaling:{deployment}:{event.time.ToNanoseconds()}"):
            return
        resource = f"{deployment}: {event.from_replicas} -> {event.to_replicas} replicas ({event.reason})"
        self.audit.record(tenant, AUTOSCALER, METHOD, resource, "OK")

    async def _claim(self, key: str) -> bool:
        """Whether this process is the one to write the row. Without Redis it writes it: a row
        twice beats a decision missing from the log."""
        if not self.link.up:
            return True
        try:
            return bool(await self.link.client.set(key, 1, nx=True, ex=CLAIM_SECONDS))
        except REDIS_DOWN_ERRORS as error:
            self.link.lost(error)
            return True
