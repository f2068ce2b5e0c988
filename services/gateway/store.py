"""Tenants, API keys, quotas, usage and the audit log in the gateway's own database (SQLite by default, PostgreSQL by URL).

Synchronous on purpose: async callers run these methods with `asyncio.to_thread`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.common.errors import AlreadyExists
from services.gateway.keys import Role

metadata = MetaData()

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("display_name", String(256), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(12), primary_key=True),
    Column("tenant", String(63), ForeignKey("tenants.name"), nullable=False, index=True),
    Column("role", String(16), nullable=False),
    Column("secret_hash", String(64), nullable=False),
    Column("description", String(1024), nullable=False),
    Column("revoked", Boolean, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("revoke_time", DateTime(timezone=True), nullable=True),
    # The key's own rate limit; NULL means the gateway's default applies.
    Column("rate_requests_per_second", Float, nullable=True),
    Column("rate_burst", Integer, nullable=True),
    Column("rate_tokens_per_minute", BigInteger, nullable=True),
)

QUOTA_FIELDS = (
    "requests_per_day",
    "requests_per_month",
    "tokens_per_day",
    "tokens_per_month",
    "training_minutes_per_day",
    "training_minutes_per_month",
)

quotas = Table(
    "quotas",
    metadata,
    Column("tenant", String(63), ForeignKey("tenants.name"), primary_key=True),
    *(Column(name, BigInteger, nullable=False) for name in QUOTA_FIELDS),
    Column("rate_requests_per_second", Float, nullable=False),
    Column("rate_burst", Integer, nullable=False),
    Column("rate_tokens_per_minute", BigInteger, nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    Column("max_replicas", Integer, nullable=False, server_default="0"),
)

USAGE_FIELDS = (
    "requests",
    "cache_hits",
    "errors",
    "input_bytes",
    "output_bytes",
    "tokens",
    "training_seconds",
    "rejected",
)

usage = Table(
    "usage",
    metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("tenant", String(63), primary_key=True),
    Column("api_key_id", String(12), primary_key=True),
    *(Column(name, BigInteger, nullable=False) for name in USAGE_FIELDS),
)

audit_events = Table(
    "audit_events",
    metadata,
    # Sorts by time: newest first is "id descending".
    Column("id", String(32), primary_key=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("tenant", String(63), nullable=False, index=True),
    Column("api_key_id", String(12), nullable=False),
    Column("method", String(200), nullable=False),
    Column("resource", String(300), nullable=False),
    Column("code", String(32), nullable=False),
)

# Jobs created through the gateway, until the seconds they ran are counted (settle_time set).
training_jobs = Table(
    "training_jobs",
    metadata,
    Column("job_id", String(100), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("api_key_id", String(12), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("settle_time", DateTime(timezone=True), nullable=True, index=True),
    Column("seconds", BigInteger, nullable=True),
)


@dataclass(frozen=True)
class TrainingJobRecord:
    job_id: str
    tenant: str
    api_key_id: str
    create_time: datetime
    settle_time: datetime | None = None
    seconds: int | None = None


@dataclass(frozen=True)
class TenantRecord:
    name: str
    display_name: str
    create_time: datetime


@dataclass(frozen=True)
class RateLimit:
    """Zero means unlimited."""

    requests_per_second: float = 0.0
    burst: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant: str
    role: Role
    secret_hash: str
    description: str
    revoked: bool
    create_time: datetime
    revoke_time: datetime | None
    rate_limit: RateLimit | None = None  # None: the gateway's default applies


@dataclass(frozen=True)
class QuotaRecord:
    """A tenant's budgets (zero = unlimited), tenant-wide rate limit and cap on replicas."""

    tenant: str
    requests_per_day: int = 0
    requests_per_month: int = 0
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    training_minutes_per_day: int = 0
    training_minutes_per_month: int = 0
    rate_limit: RateLimit = RateLimit()
    update_time: datetime | None = None
    # Replicas its deployments may reserve together; 0: the inference service's default.
    max_replicas: int = 0


@dataclass(frozen=True)
class UsageRecord:
    day: str
    tenant: str
    api_key_id: str  # empty when summed over the tenant's keys
    counts: dict[str, int]


@dataclass(frozen=True)
class AuditRecord:
    id: str
    time: datetime
    tenant: str
    api_key_id: str
    method: str
    resource: str
    code: str


@dataclass(frozen=True)
class AuditFilter:
    tenant: str = ""
    api_key_id: str = ""
    method: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


def utc_now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every time we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _tenant(row) -> TenantRecord:  # type: ignore[no-untyped-def]
    return TenantRecord(row.name, row.display_name, _utc(row.create_time))


def _key(row) -> KeyRecord:  # type: ignore[no-untyped-def]
    rate_limit = None
    if row.rate_requests_per_second is not None:
        rate_limit = RateLimit(row.rate_requests_per_second, row.rate_burst, row.rate_tokens_per_minute)
    return KeyRecord(
        id=row.id,
        tenant=row.tenant,
        role=Role[row.role.upper()],
        secret_hash=row.secret_hash,
        description=row.description,
        revoked=row.revoked,
        create_time=_utc(row.create_time),
        revoke_time=_utc(row.revoke_time),
        rate_limit=rate_limit,
    )


def _quota(row) -> QuotaRecord:  # type: ignore[no-untyped-def]
    rate_limit = RateLimit(row.rate_requests_per_second, row.rate_burst, row.rate_tokens_per_minute)
    budgets = {name: getattr(row, name) for name in QUOTA_FIELDS}
    return QuotaRecord(
        row.tenant,
        **budgets,
        rate_limit=rate_limit,
        update_time=_utc(row.update_time),
        max_replicas=row.max_replicas,
    )


def _training_job(row) -> TrainingJobRecord:  # type: ignore[no-untyped-def]
    return TrainingJobRecord(
        row.job_id, row.tenant, row.api_key_id, _utc(row.create_time), _utc(row.settle_time), row.seconds
    )


def _rate_columns(rate_limit: RateLimit | None) -> dict[str, float | int | None]:
    return {
        "rate_requests_per_second": rate_limit.requests_per_second if rate_limit else None,
        "rate_burst": rate_limit.burst if rate_limit else None,
        "rate_tokens_per_minute": rate_limit.tokens_per_minute if rate_limit else None,
    }


class GatewayStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create_tenant(self, tenant: TenantRecord) -> None:
        try:
            with Session(self.engine) as session, session.begin():
                session.execute(
                    insert(tenants).values(
                        name=tenant.name, display_name=tenant.display_name, create_time=tenant.create_time
                    )
                )
        except IntegrityError:
            raise AlreadyExists(f"tenant {tenant.name!r} already exists") from None

    def get_tenant(self, name: str) -> TenantRecord | None:
        with Session(self.engine) as session:
            row = session.execute(select(tenants).where(tenants.c.name == name)).first()
        return _tenant(row) if row else None

    def list_tenants(self, after: str, limit: int) -> list[TenantRecord]:
        query = select(tenants).where(tenants.c.name > after).order_by(tenants.c.name).limit(limit)
        with Session(self.engine) as session:
            return [_tenant(row) for row in session.execute(query)]

    def create_key(self, key: KeyRecord) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(
                insert(api_keys).values(
                    id=key.id,
                    tenant=key.tenant,
                    role=key.role.name.lower(),
                    secret_hash=key.secret_hash,
                    description=key.description,
                    revoked=key.revoked,
                    create_time=key.create_time,
                    revoke_time=key.revoke_time,
                    **_rate_columns(key.rate_limit),
                )
            )

    def get_key(self, key_id: str) -> KeyRecord | None:
        with Session(self.engine) as session:
            row = session.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _key(row) if row else None

    def list_keys(self, tenant: str | None, after: str, limit: int) -> list[KeyRecord]:
        query = select(api_keys).where(api_keys.c.id > after).order_by(api_keys.c.id).limit(limit)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with Session(self.engine) as session:
            return [_key(row) for row in session.execute(query)]

    def revoke_key(self, key_id: str, when: datetime) -> KeyRecord | None:
        """Marks the key revoked (keeping the first revoke time) and returns it; None if unknown."""
        with Session(self.engine) as session, session.begin():
            session.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked.is_(False))
                .values(revoked=True, revoke_time=when)
            )
            row = session.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _key(row) if row else None

    def active_admin_key_ids(self) -> list[str]:
        query = select(api_keys.c.id).where(
            api_keys.c.role == Role.ADMIN.name.lower(), api_keys.c.revoked.is_(False)
        )
        with Session(self.engine) as session:
            return list(session.scalars(query))

    def set_key_rate_limit(self, key_id: str, rate_limit: RateLimit | None) -> KeyRecord | None:
        with Session(self.engine) as session, session.begin():
            session.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(**_rate_columns(rate_limit))
            )
            row = session.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
        return _key(row) if row else None

    def set_quota(self, quota: QuotaRecord) -> None:
        values = {name: getattr(quota, name) for name in QUOTA_FIELDS}
        values.update(
            _rate_columns(quota.rate_limit), update_time=quota.update_time, max_replicas=quota.max_replicas
        )
        upsert = self._insert(quotas).values(tenant=quota.tenant, **values)
        with Session(self.engine) as session, session.begin():
            session.execute(upsert.on_conflict_do_update(index_elements=["tenant"], set_=values))

    def get_quota(self, tenant: str) -> QuotaRecord | None:
        with Session(self.engine) as session:
            row = session.execute(select(quotas).where(quotas.c.tenant == tenant)).first()
        return _quota(row) if row else None

    def add_usage(self, rows: list[UsageRecord]) -> None:
        """Adds each row's counts to what is stored for its (day, tenant, key), in one transaction."""
        with Session(self.engine) as session, session.begin():
            for row in rows:
                counts = {name: row.counts.get(name, 0) for name in USAGE_FIELDS}
                upsert = self._insert(usage).values(
                    day=row.day, tenant=row.tenant, api_key_id=row.api_key_id, **counts
                )
                added = {name: usage.c[name] + upsert.excluded[name] for name in USAGE_FIELDS}
                session.execute(
                    upsert.on_conflict_do_update(index_elements=["day", "tenant", "api_key_id"], set_=added)
                )

    def get_usage(self, tenant: str, api_key_id: str, first_day: str, last_day: str) -> list[UsageRecord]:
        """One row per day, oldest first: the key's own, or summed over the tenant's keys."""
        sums = [func.sum(usage.c[name]).label(name) for name in USAGE_FIELDS]
        query = (
            select(usage.c.day, *sums)
            .where(usage.c.tenant == tenant, usage.c.day >= first_day, usage.c.day <= last_day)
            .group_by(usage.c.day)
            .order_by(usage.c.day)
        )
        if api_key_id:
            query = query.where(usage.c.api_key_id == api_key_id)
        with Session(self.engine) as session:
            found = session.execute(query).all()
        return [
            UsageRecord(row.day, tenant, api_key_id, {name: int(getattr(row, name)) for name in USAGE_FIELDS})
            for row in found
        ]

    def add_audit_events(self, events: list[AuditRecord]) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(insert(audit_events), [vars(event) for event in events])

    def list_audit_events(self, where: AuditFilter, before: str, limit: int) -> list[AuditRecord]:
        """Newest first; `before` is the id of the last event of the previous page."""
        query = select(audit_events).order_by(audit_events.c.id.desc()).limit(limit)
        if before:
            query = query.where(audit_events.c.id < before)
        if where.tenant:
            query = query.where(audit_events.c.tenant == where.tenant)
        if where.api_key_id:
            query = query.where(audit_events.c.api_key_id == where.api_key_id)
        if where.method:
            column = audit_events.c.method
            query = query.where((column == where.method) | column.endswith("/" + where.method))
        if where.start_time is not None:
            query = query.where(audit_events.c.time >= where.start_time)
        if where.end_time is not None:
            query = query.where(audit_events.c.time < where.end_time)
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        return [
            AuditRecord(r.id, _utc(r.time), r.tenant, r.api_key_id, r.method, r.resource, r.code)
            for r in rows
        ]

    def add_training_job(self, job: TrainingJobRecord) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(
                self._insert(training_jobs)
                .values(
                    job_id=job.job_id, tenant=job.tenant, api_key_id=job.api_key_id, create_time=job.create_time
                )
                .on_conflict_do_nothing(index_elements=["job_id"])
            )

    def unsettled_training_jobs(self, after: str, limit: int) -> list[TrainingJobRecord]:
        """A page of unsettled jobs by id (the trainer's ids sort by creation), after `after`."""
        query = (
            select(training_jobs)
            .where(training_jobs.c.settle_time.is_(None), training_jobs.c.job_id > after)
            .order_by(training_jobs.c.job_id)
            .limit(limit)
        )
        with Session(self.engine) as session:
            return [_training_job(row) for row in session.execute(query)]

    def settle_training_job(self, job_id: str, seconds: int, when: datetime) -> bool:
        """Marks the job settled; False if it was already (by another gateway replica)."""
        with Session(self.engine) as session, session.begin():
            result = session.execute(
                update(training_jobs)
                .where(training_jobs.c.job_id == job_id, training_jobs.c.settle_time.is_(None))
                .values(settle_time=when, seconds=seconds)
            )
        return result.rowcount == 1

    def get_training_job(self, job_id: str) -> TrainingJobRecord | None:
        with Session(self.engine) as session:
            row = session.execute(select(training_jobs).where(training_jobs.c.job_id == job_id)).first()
        return _training_job(row) if row else None

    def _insert(self, table: Table):  # type: ignore[no-untyped-def]
        """INSERT with ON CONFLICT support for the engine's dialect."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)
