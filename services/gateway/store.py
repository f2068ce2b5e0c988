"""Tenants, API keys, quotas, usage and the audit log in the gateway's own database (SQLite by default, PostgreSQL by URL).

Synchronous on purpose: async callers run these methods with `asyncio.to_thread`.
"""

from __future__ import annotations

from collections.abc import Collection
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
    Text,
    UniqueConstraint,
    delete,
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
    # How many bytes a download sent; NULL for every other call.
    Column("bytes", BigInteger, nullable=True),
)

# How far the gateway has copied a log another service keeps into its own tables (the trainer's
# retraining events into the audit log): the id of the last entry copied, by log.
cursors = Table(
    "cursors",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

# What each tenant used per UTC day, by billable resource and price tier, in the resource's
# base unit (requests, tokens, seconds); invoices price these rows.
billable_usage = Table(
    "billable_usage",
    metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("tenant", String(63), primary_key=True),
    Column("resource", String(32), primary_key=True),
    Column("tier", String(32), primary_key=True),
    Column("quantity", BigInteger, nullable=False),
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

# The price book: a price applies from its effective day until the next one of its resource and tier.
prices = Table(
    "prices",
    metadata,
    Column("resource", String(32), primary_key=True),
    Column("tier", String(32), primary_key=True),  # "" for every tier without a price of its own
    Column("effective_day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("amount", String(32), nullable=False),  # a decimal string, exact
    Column("currency", String(3), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

# Plans are immutable once defined, so that past invoices keep their allowances.
plans = Table(
    "plans",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

plan_allowances = Table(
    "plan_allowances",
    metadata,
    Column("plan", String(63), ForeignKey("plans.name"), primary_key=True),
    Column("resource", String(32), primary_key=True),
    Column("tier", String(32), primary_key=True),
    Column("quantity", BigInteger, nullable=False),  # per month, in the resource's base unit
)

# A tenant's plan from the first day of start_month until its next row.
tenant_plans = Table(
    "tenant_plans",
    metadata,
    Column("tenant", String(63), ForeignKey("tenants.name"), primary_key=True),
    Column("start_month", String(7), primary_key=True),  # YYYY-MM
    Column("plan", String(63), ForeignKey("plans.name"), nullable=False),
)

budgets = Table(
    "budgets",
    metadata,
    Column("tenant", String(63), ForeignKey("tenants.name"), primary_key=True),
    Column("amount", String(32), nullable=False),  # per month
    Column("currency", String(3), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

# Finalized invoices: the computed invoice as it was stored, never recomputed nor changed but
# for the credited sum its credit notes add.
invoices = Table(
    "invoices",
    metadata,
    Column("number", String(32), primary_key=True),  # INV-YYYY-MM-NNNN
    Column("tenant", String(63), ForeignKey("tenants.name"), nullable=False),
    Column("month", String(7), nullable=False),
    Column("currency", String(3), nullable=False),
    # In the currency's minor unit, so that SQL can refuse credits beyond the total.
    Column("total_minor", BigInteger, nullable=False),
    Column("credited_minor", BigInteger, nullable=False),
    Column("document", Text, nullable=False),  # billing.Invoice.document()
    Column("finalize_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant", "month", name="uq_invoices_tenant_month"),
)

credit_notes = Table(
    "credit_notes",
    metadata,
    Column("number", String(32), primary_key=True),  # CN-YYYY-MM-NNNN, the month it was issued
    Column("invoice_number", String(32), ForeignKey("invoices.number"), nullable=False, index=True),
    Column("tenant", String(63), nullable=False),
    Column("amount", String(32), nullable=False),
    Column("reason", String(1024), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

# The last number given in each series (INV-2026-12, CN-2027-01), moved in the transaction that
# stores the numbered document: a rolled-back one gives its number back, so there are no gaps.
billing_counters = Table(
    "billing_counters",
    metadata,
    Column("series", String(16), primary_key=True),
    Column("last_number", Integer, nullable=False),
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
class BillableRecord:
    day: str
    tenant: str
    resource: str  # requests, input_tokens, ..., replica_seconds (README, "Billing")
    tier: str  # fp32, fp16, int8, distilled; "" where the resource has no tiers
    quantity: int


@dataclass(frozen=True)
class AuditRecord:
    id: str
    time: datetime
    tenant: str
    api_key_id: str
    method: str
    resource: str
    code: str
    bytes: int | None = None  # a download's bytes sent; None for every other call


@dataclass(frozen=True)
class AuditFilter:
    tenant: str = ""
    api_key_id: str = ""
    method: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True)
class PriceRecord:
    resource: str
    tier: str
    effective_day: str
    amount: str  # a decimal string
    currency: str
    create_time: datetime


@dataclass(frozen=True)
class AllowanceRecord:
    resource: str
    tier: str
    quantity: int


@dataclass(frozen=True)
class PlanRecord:
    name: str
    allowances: tuple[AllowanceRecord, ...]  # by resource and tier
    create_time: datetime


@dataclass(frozen=True)
class BudgetRecord:
    tenant: str
    amount: str
    currency: str
    update_time: datetime


@dataclass(frozen=True)
class CreditNoteRecord:
    number: str
    invoice_number: str
    tenant: str
    amount: str
    reason: str
    create_time: datetime


@dataclass(frozen=True)
class StoredInvoice:
    number: str
    tenant: str
    month: str
    currency: str
    total_minor: int
    credited_minor: int
    document: str
    finalize_time: datetime
    credit_notes: tuple[CreditNoteRecord, ...] = ()


class _NotCredited(Exception):
    """Rolls back a credit note that the invoice's balance no longer covers."""


class _CursorMoved(Exception):
    """Rolls back a copy whose cursor another process moved first."""


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


def _budget(row) -> BudgetRecord:  # type: ignore[no-untyped-def]
    return BudgetRecord(row.tenant, row.amount, row.currency, _utc(row.update_time))


def _credit_note(row) -> CreditNoteRecord:  # type: ignore[no-untyped-def]
    return CreditNoteRecord(**{**row._mapping, "create_time": _utc(row.create_time)})


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

    def key_ids_starting_with(self, prefix: str, tenant: str | None, limit: int) -> list[str]:
        """Ids of the keys (of `tenant` when given) that start with `prefix`, `%` and `_` taken
        literally; the id equal to `prefix` first."""
        query = (
            select(api_keys.c.id)
            .where(api_keys.c.id.startswith(prefix, autoescape=True))
            .order_by(api_keys.c.id)
            .limit(limit)
        )
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        with Session(self.engine) as session:
            return list(session.scalars(query))

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

    def set_quota(self, quota: QuotaRecord, columns: Collection[str] | None = None) -> None:
        """Store the quota; with `columns`, a stored row changes only in those columns, so two
        admins changing different budgets at once both keep their change."""
        values = {name: getattr(quota, name) for name in QUOTA_FIELDS}
        values.update(
            _rate_columns(quota.rate_limit), update_time=quota.update_time, max_replicas=quota.max_replicas
        )
        changed = values if columns is None else {
            name: value for name, value in values.items() if name in columns or name == "update_time"
        }
        upsert = self._insert(quotas).values(tenant=quota.tenant, **values)
        with Session(self.engine) as session, session.begin():
            session.execute(upsert.on_conflict_do_update(index_elements=["tenant"], set_=changed))

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

    def add_billable_usage(self, rows: list[BillableRecord]) -> None:
        """Adds each row's quantity to what is stored for its (day, tenant, resource, tier), in one transaction."""
        with Session(self.engine) as session, session.begin():
            for row in rows:
                self._add_billable(session, row)

    def _add_billable(self, session: Session, row: BillableRecord) -> None:
        upsert = self._insert(billable_usage).values(
            day=row.day, tenant=row.tenant, resource=row.resource, tier=row.tier, quantity=row.quantity
        )
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=["day", "tenant", "resource", "tier"],
                set_={"quantity": billable_usage.c.quantity + upsert.excluded.quantity},
            )
        )

    def billable_usage(self, tenant: str, first_day: str, last_day: str) -> list[BillableRecord]:
        """The tenant's rows between two UTC days (inclusive), by day, resource and tier."""
        query = (
            select(billable_usage)
            .where(billable_usage.c.tenant == tenant, billable_usage.c.day.between(first_day, last_day))
            .order_by(billable_usage.c.day, billable_usage.c.resource, billable_usage.c.tier)
        )
        with Session(self.engine) as session:
            return [BillableRecord(**row._mapping) for row in session.execute(query)]

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
            query = query.where((column == where.method) | column.endswith("/" + where.method, autoescape=True))
        if where.start_time is not None:
            query = query.where(audit_events.c.time >= where.start_time)
        if where.end_time is not None:
            query = query.where(audit_events.c.time < where.end_time)
        with Session(self.engine) as session:
            rows = session.execute(query).all()
        return [
            AuditRecord(r.id, _utc(r.time), r.tenant, r.api_key_id, r.method, r.resource, r.code, r.bytes)
            for r in rows
        ]

    def cursor(self, name: str) -> int:
        """The id of the last entry copied of log `name`; 0 before the first copy."""
        with Session(self.engine) as session:
            return session.execute(select(cursors.c.position).where(cursors.c.name == name)).scalar() or 0

    def copy_audit_events(self, name: str, after: int, to: int, events: list[AuditRecord]) -> bool:
        """Moves cursor `name` from `after` to `to` and adds `events` (the entries in between) to the
        audit log in one transaction, so that each is written exactly once; False, writing nothing,
        when the cursor is no longer at `after` (another gateway process copied them)."""
        try:
            with Session(self.engine) as session, session.begin():
                moved = session.execute(
                    update(cursors).where(cursors.c.name == name, cursors.c.position == after).values(position=to)
                )
                if moved.rowcount != 1:
                    if after:
                        raise _CursorMoved
                    # The first copy makes the row; of two first copies, the second fails here.
                    session.execute(insert(cursors).values(name=name, position=to))
                if events:
                    session.execute(insert(audit_events), [vars(event) for event in events])
        except (_CursorMoved, IntegrityError):
            return False
        return True

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

    def settle_training_job(
        self, job_id: str, seconds: int, when: datetime, billed: BillableRecord | None = None
    ) -> bool:
        """Marks the job settled and adds `billed` to billable usage in the same transaction, so that
        a job is billed exactly once; False if it was settled already (by another gateway replica)."""
        with Session(self.engine) as session, session.begin():
            result = session.execute(
                update(training_jobs)
                .where(training_jobs.c.job_id == job_id, training_jobs.c.settle_time.is_(None))
                .values(settle_time=when, seconds=seconds)
            )
            if result.rowcount == 1 and billed is not None:
                self._add_billable(session, billed)
        return result.rowcount == 1

    def get_training_job(self, job_id: str) -> TrainingJobRecord | None:
        with Session(self.engine) as session:
            row = session.execute(select(training_jobs).where(training_jobs.c.job_id == job_id)).first()
        return _training_job(row) if row else None

    # --- billing ------------------------------------------------------------------------------
    def set_price(self, price: PriceRecord) -> None:
        """Adds the price, or replaces the one of the same resource, tier and effective day."""
        values = vars(price)
        upsert = self._insert(prices).values(**values)
        changed = {"amount": price.amount, "currency": price.currency, "create_time": price.create_time}
        with Session(self.engine) as session, session.begin():
            session.execute(
                upsert.on_conflict_do_update(index_elements=["resource", "tier", "effective_day"], set_=changed)
            )

    def list_prices(self) -> list[PriceRecord]:
        """Every price ever set, by resource, tier and effective day."""
        query = select(prices).order_by(prices.c.resource, prices.c.tier, prices.c.effective_day)
        with Session(self.engine) as session:
            return [
                PriceRecord(**{**row._mapping, "create_time": _utc(row.create_time)}) for row in session.execute(query)
            ]

    def define_plan(self, plan: PlanRecord) -> PlanRecord:
        """Stores the plan unless one of that name exists; returns the stored one either way."""
        try:
            with Session(self.engine) as session, session.begin():
                session.execute(insert(plans).values(name=plan.name, create_time=plan.create_time))
                if plan.allowances:
                    session.execute(
                        insert(plan_allowances), [{"plan": plan.name, **vars(a)} for a in plan.allowances]
                    )
        except IntegrityError:
            pass
        stored = self.get_plan(plan.name)
        assert stored is not None
        return stored

    def get_plan(self, name: str) -> PlanRecord | None:
        found = self._plans(plans.c.name == name)
        return found[0] if found else None

    def list_plans(self) -> list[PlanRecord]:
        return self._plans(None)

    def _plans(self, where) -> list[PlanRecord]:  # type: ignore[no-untyped-def]
        plan_query = select(plans).order_by(plans.c.name)
        allowance_query = select(plan_allowances).order_by(plan_allowances.c.resource, plan_allowances.c.tier)
        if where is not None:
            plan_query = plan_query.where(where)
            allowance_query = allowance_query.where(plan_allowances.c.plan.in_(select(plans.c.name).where(where)))
        with Session(self.engine) as session:
            rows = session.execute(plan_query).all()
            allowances: dict[str, list[AllowanceRecord]] = {row.name: [] for row in rows}
            for row in session.execute(allowance_query):
                allowances[row.plan].append(AllowanceRecord(row.resource, row.tier, row.quantity))
        return [PlanRecord(row.name, tuple(allowances[row.name]), _utc(row.create_time)) for row in rows]

    def set_tenant_plan(self, tenant: str, start_month: str, plan: str) -> None:
        upsert = self._insert(tenant_plans).values(tenant=tenant, start_month=start_month, plan=plan)
        with Session(self.engine) as session, session.begin():
            session.execute(
                upsert.on_conflict_do_update(index_elements=["tenant", "start_month"], set_={"plan": plan})
            )

    def tenant_plan(self, tenant: str, month: str) -> str:
        """The plan of the tenant in `month` (YYYY-MM); "" without one."""
        query = (
            select(tenant_plans.c.plan)
            .where(tenant_plans.c.tenant == tenant, tenant_plans.c.start_month <= month)
            .order_by(tenant_plans.c.start_month.desc())
            .limit(1)
        )
        with Session(self.engine) as session:
            return session.scalar(query) or ""

    def set_budget(self, budget: BudgetRecord) -> None:
        upsert = self._insert(budgets).values(**vars(budget))
        changed = {"amount": budget.amount, "currency": budget.currency, "update_time": budget.update_time}
        with Session(self.engine) as session, session.begin():
            session.execute(upsert.on_conflict_do_update(index_elements=["tenant"], set_=changed))

    def delete_budget(self, tenant: str) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(delete(budgets).where(budgets.c.tenant == tenant))

    def get_budget(self, tenant: str) -> BudgetRecord | None:
        with Session(self.engine) as session:
            row = session.execute(select(budgets).where(budgets.c.tenant == tenant)).first()
        return _budget(row) if row else None

    def list_budgets(self) -> list[BudgetRecord]:
        with Session(self.engine) as session:
            return [_budget(row) for row in session.execute(select(budgets).order_by(budgets.c.tenant))]

    def get_invoice(self, tenant: str, month: str) -> StoredInvoice | None:
        return self._invoice((invoices.c.tenant == tenant) & (invoices.c.month == month))

    def get_invoice_by_number(self, number: str) -> StoredInvoice | None:
        return self._invoice(invoices.c.number == number)

    def _invoice(self, where) -> StoredInvoice | None:  # type: ignore[no-untyped-def]
        with Session(self.engine) as session:
            row = session.execute(select(invoices).where(where)).first()
            if row is None:
                return None
            notes = session.execute(
                select(credit_notes)
                .where(credit_notes.c.invoice_number == row.number)
                .order_by(credit_notes.c.number)
            ).all()
        return StoredInvoice(
            **{**row._mapping, "finalize_time": _utc(row.finalize_time)},
            credit_notes=tuple(_credit_note(note) for note in notes),
        )

    def finalize_invoice(
        self, tenant: str, month: str, currency: str, total_minor: int, document: str, when: datetime
    ) -> StoredInvoice:
        """Stores the invoice under the next number of its month, or returns the one stored
        already (by another gateway too): the number and the invoice are written in one
        transaction, so a lost race gives its number back and numbers have no gaps."""
        try:
            with Session(self.engine) as session, session.begin():
                # The counter's write comes first: concurrent finalizations wait here in turn.
                number = f"INV-{month}-{self._next_number(session, f'INV-{month}'):04d}"
                session.execute(
                    insert(invoices).values(
                        number=number,
                        tenant=tenant,
                        month=month,
                        currency=currency,
                        total_minor=total_minor,
                        credited_minor=0,
                        document=document,
                        finalize_time=when,
                    )
                )
        except IntegrityError:
            pass  # finalized already: the stored one stands
        stored = self.get_invoice(tenant, month)
        assert stored is not None
        return stored

    def add_credit_note(self, note: CreditNoteRecord, amount_minor: int, series: str) -> CreditNoteRecord | None:
        """Stores the note under the next number of `series` (e.g. CN-2027-01), adding its amount
        to the invoice's credited sum in the same transaction; None when that sum would pass the
        invoice's total (nothing is stored then)."""
        try:
            with Session(self.engine) as session, session.begin():
                credited = session.execute(
                    update(invoices)
                    .where(
                        invoices.c.number == note.invoice_number,
                        invoices.c.total_minor - invoices.c.credited_minor >= amount_minor,
                    )
                    .values(credited_minor=invoices.c.credited_minor + amount_minor)
                )
                if credited.rowcount != 1:
                    raise _NotCredited
                number = f"{series}-{self._next_number(session, series):04d}"
                stored = CreditNoteRecord(**{**vars(note), "number": number})
                session.execute(insert(credit_notes).values(**vars(stored)))
        except _NotCredited:
            return None
        return stored

    def _next_number(self, session: Session, series: str) -> int:
        upsert = self._insert(billing_counters).values(series=series, last_number=1)
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=["series"], set_={"last_number": billing_counters.c.last_number + 1}
            )
        )
        return session.execute(
            select(billing_counters.c.last_number).where(billing_counters.c.series == series)
        ).scalar_one()

    def _insert(self, table: Table):  # type: ignore[no-untyped-def]
        """INSERT with ON CONFLICT support for the engine's dialect."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)
