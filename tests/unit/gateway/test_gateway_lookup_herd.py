"""When a cached key or quota expires under load, the callers in flight share one SQL lookup
(a profile of the gateway found one per concurrent caller, every cache period)."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime

from services.gateway.admission import QuotaCache
from services.gateway.auth import ApiKeyAuthenticator
from services.gateway.keys import Role, generate_key
from services.gateway.store import KeyRecord, QuotaRecord

CALLERS = 16


class SlowStore:
    """Counts lookups; each takes a while, as a database query does."""

    def __init__(self, key: KeyRecord) -> None:
        self.key = key
        self.lookups = 0
        self._lock = threading.Lock()

    def _count(self) -> None:
        with self._lock:
            self.lookups += 1
        time.sleep(0.05)

    def get_key(self, key_id: str) -> KeyRecord | None:
        self._count()
        return self.key if key_id == self.key.id else None

    def get_quota(self, tenant: str) -> QuotaRecord | None:
        self._count()
        return QuotaRecord(tenant, requests_per_day=5)


def record(new) -> KeyRecord:
    return KeyRecord(new.id, "acme", Role.READER, new.secret_hash, "", False, datetime.now(UTC), None)


async def test_concurrent_callers_after_expiry_share_one_key_lookup():
    new = generate_key()
    store = SlowStore(record(new))
    clock = [0.0]
    authenticate = ApiKeyAuthenticator(store, cache_seconds=1.0, clock=lambda: clock[0])  # type: ignore[arg-type]
    metadata = {"authorization": f"Bearer {new.plaintext}"}
    method = "/maas.inference.v1.InferenceService/Predict"
    await asyncio.gather(*(authenticate(method, metadata) for _ in range(CALLERS)))
    assert store.lookups == 1
    clock[0] = 5.0  # the cached key expired
    await asyncio.gather(*(authenticate(method, metadata) for _ in range(CALLERS)))
    assert store.lookups == 2


async def test_concurrent_callers_share_one_quota_lookup():
    store = SlowStore(record(generate_key()))
    quotas = QuotaCache(store, seconds=1.0)  # type: ignore[arg-type]
    found = await asyncio.gather(*(quotas.get("acme") for _ in range(CALLERS)))
    assert store.lookups == 1 and {q.requests_per_day for q in found} == {5}
