"""Tenants and API keys in the gateway's own database (SQLite by default, PostgreSQL by URL).

Synchronous on purpose: async callers run these methods with `asyncio.to_thread`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Engine,
    ForeignKey,
    MetaData,
    String,
    Table,
    insert,
    select,
    update,
)
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
)


@dataclass(frozen=True)
class TenantRecord:
    name: str
    display_name: str
    create_time: datetime


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


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every time we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _tenant(row) -> TenantRecord:  # type: ignore[no-untyped-def]
    return TenantRecord(row.name, row.display_name, _utc(row.create_time))


def _key(row) -> KeyRecord:  # type: ignore[no-untyped-def]
    return KeyRecord(
        id=row.id,
        tenant=row.tenant,
        role=Role[row.role.upper()],
        secret_hash=row.secret_hash,
        description=row.description,
        revoked=row.revoked,
        create_time=_utc(row.create_time),
        revoke_time=_utc(row.revoke_time),
    )


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
