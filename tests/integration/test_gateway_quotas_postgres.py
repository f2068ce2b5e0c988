"""Quotas, key rate limits, usage sums and the audit log on a real PostgreSQL (the upserts
differ by dialect)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.database import make_engine, upgrade
from services.gateway.keys import Role
from services.gateway.server import MIGRATIONS
from services.gateway.service import Admin
from services.gateway.store import AuditFilter, AuditRecord, GatewayStore, QuotaRecord, RateLimit, UsageRecord

pytestmark = pytest.mark.postgres


async def test_quotas_usage_and_audit_on_postgres(postgres_url) -> None:
    engine = make_engine(postgres_url)
    upgrade(engine, MIGRATIONS)
    store = GatewayStore(engine)
    admin = Admin(store)
    try:
        await admin.create_tenant("acme", "")
        key = (await admin.create_key("acme", Role.READER, "")).key
        limited = await admin.set_key_rate_limit(key.id, RateLimit(5.0, 10, 0))
        assert limited.rate_limit == RateLimit(5.0, 10, 0)
        assert (await admin.set_key_rate_limit(key.id, None)).rate_limit is None

        await admin.set_quota(QuotaRecord("acme", requests_per_day=100))
        await admin.set_quota(QuotaRecord("acme", requests_per_day=200, rate_limit=RateLimit(1.5, 3, 60)))
        quota = await admin.get_quota("acme")
        assert quota.requests_per_day == 200 and quota.rate_limit == RateLimit(1.5, 3, 60)

        day = "2026-01-02"
        store.add_usage([UsageRecord(day, "acme", key.id, {"requests": 2, "errors": 1})])
        store.add_usage(
            [
                UsageRecord(day, "acme", key.id, {"requests": 3}),
                UsageRecord(day, "acme", "k2", {"requests": 1}),
            ]
        )
        [mine] = store.get_usage("acme", key.id, day, day)
        assert (mine.counts["requests"], mine.counts["errors"]) == (5, 1)
        [summed] = store.get_usage("acme", "", "2026-01-01", "2026-01-31")
        assert summed.counts["requests"] == 6

        now = datetime.now(UTC)
        events = [
            AuditRecord(
                f"{i:032d}", now + timedelta(seconds=i), "acme", key.id, "/x.Y/DeleteModel", "m", "OK"
            )
            for i in range(3)
        ]
        store.add_audit_events(events)
        newest = store.list_audit_events(AuditFilter(tenant="acme", method="DeleteModel"), "", 2)
        assert [e.id for e in newest] == [events[2].id, events[1].id]
        assert [e.id for e in store.list_audit_events(AuditFilter(), events[1].id, 10)] == [events[0].id]
    finally:
        engine.dispose()
