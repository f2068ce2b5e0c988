"""Step two of every call, right after authentication: rate limits and quotas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.common.single_flight import SingleFlight
from services.gateway.audit import AuditLog, is_mutating
from services.gateway.limits import Gate, RateLimited
from services.gateway.store import GatewayStore, QuotaRecord, RateLimit
from services.gateway.usage import Meter

# AdminService and BillingService are never limited nor counted as requests: an admin must
# always be able to lift a limit, and a tenant to read its usage, invoices and spend.
EXEMPT_PREFIXES = ("/maas.gateway.v1.AdminService/", "/maas.gateway.v1.BillingService/")


class QuotaCache:
    """Each tenant's quota from SQL, reused for `seconds` (how late SetQuota may take effect)."""

    def __init__(
        self, store: GatewayStore, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.seconds = seconds
        self.clock = clock
        self._cache: dict[str, tuple[float, QuotaRecord]] = {}
        self._lookups: SingleFlight[QuotaRecord | None] = SingleFlight()

    async def get(self, tenant: str) -> QuotaRecord:
        now = self.clock()
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        quota = await self._lookups.run(tenant, lambda: asyncio.to_thread(self.store.get_quota, tenant))
        quota = quota or QuotaRecord(tenant)
        self._cache[tenant] = (now + self.seconds, quota)
        return quota

    def forget(self, tenant: str) -> None:
        self._cache.pop(tenant, None)


class Admission:
    def __init__(self, gate: Gate, quotas: QuotaCache, meter: Meter, audit: AuditLog) -> None:
        self.gate = gate
        self.quotas = quotas
        self.meter = meter
        self.audit = audit

    async def admit(self, tenant: str, key_id: str, key_limit: RateLimit | None, method: str) -> None:
        """Reserve this call against every limit that applies, or raise RateLimited."""
        if method.startswith(EXEMPT_PREFIXES):
            return
        quota = await self.quotas.get(tenant)
        try:
            # Counts the call in usage (requests or rejected) in the same step. A call that changes
            # nothing may come from a lease: its count then reaches Redis with the Meter's next
            # push. A change's count is in Redis before it is acknowledged, as its audit row is.
            await self.gate.admit(tenant, key_id, key_limit, quota, lease=not is_mutating(method))
        except RateLimited:
            if is_mutating(method):
                self.audit.record(tenant, key_id, method, "", "RESOURCE_EXHAUSTED")
            raise

    async def reserve_tokens(self, tenant: str, key_id: str, key_limit: RateLimit | None, tokens: int) -> None:
        """Before a text call already admitted as a request: reserve its most tokens, or raise
        RateLimited."""
        try:
            await self.gate.reserve_tokens(tenant, key_id, key_limit, await self.quotas.get(tenant), tokens)
        except RateLimited:
            self.meter.add(tenant, key_id, rejected=1)
            raise

    async def settle_tokens(
        self, tenant: str, key_id: str, key_limit: RateLimit | None, reserved: int, used: int
    ) -> None:
        """After a text call: count the tokens it used instead of the reservation, and meter them."""
        await self.gate.settle_tokens(tenant, key_id, key_limit, await self.quotas.get(tenant), reserved, used)
        self.meter.add(tenant, key_id, tokens=used)

    async def check_training(self, tenant: str) -> None:
        await self.gate.check_training(tenant, await self.quotas.get(tenant))

    async def settle_training(self, tenant: str, key_id: str, seconds: int) -> None:
        """Where the trainer's report of the seconds a job ran lands (see the report's notes)."""
        await self.gate.settle_training(tenant, await self.quotas.get(tenant), seconds)
        self.meter.add(tenant, key_id, training_seconds=seconds)
