"""Tenants, API keys, quotas, usage and audit events: the gateway's own domain logic (no gRPC here)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import TypeVar

from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.validation import MATCHES_NAMED, Page, check_id_prefix, check_name, one_match
from services.gateway.admission import QuotaCache
from services.gateway.audit import AuditLog
from services.gateway.auth import Caller
from services.gateway.keys import ADMIN_TENANT, Role, generate_key
from services.gateway.store import (
    QUOTA_FIELDS,
    AuditFilter,
    AuditRecord,
    GatewayStore,
    KeyRecord,
    QuotaRecord,
    RateLimit,
    TenantRecord,
    UsageRecord,
    utc_now,
)
from services.gateway.usage import Meter

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_DISPLAY_NAME = 256
MAX_DESCRIPTION = 1024
DEFAULT_USAGE_DAYS = 7
# What the SQL columns hold (signed 64- and 32-bit) and what the limiter's float math handles.
MAX_BUDGET = 2**53
MAX_BURST = 2**31 - 1
MAX_REPLICAS = 2**31 - 1
MAX_RATE = 1e9
MAX_USAGE_DAYS = 366
QUOTA_BUDGETS = (*QUOTA_FIELDS, "max_replicas")
RATE_FIELDS = tuple(field.name for field in dataclasses.fields(RateLimit))
QUOTA_PATHS = {*QUOTA_BUDGETS, "rate_limit", *(f"rate_limit.{name}" for name in RATE_FIELDS)}


@dataclass(frozen=True)
class CreatedKey:
    key: KeyRecord
    plaintext: str


class Admin:
    """Platform and tenant administration.

    Each method that serves an RPC takes the RPC's `caller`: a platform admin (an admin key of the
    `admin` tenant) reaches every tenant, any other caller only its own. `caller` None is a trusted
    in-process call (bootstrap, maintenance), never an RPC's.
    """

    def __init__(
        self,
        store: GatewayStore,
        on_revoke: Callable[[str], None] = lambda key_id: None,
        quotas: QuotaCache | None = None,
        meter: Meter | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        # Lets this gateway's auth cache forget a changed or revoked key at once instead of
        # within its TTL.
        self.on_revoke = on_revoke
        self.quotas = quotas
        self.meter = meter
        self.audit = audit

    async def create_tenant(
        self, name: str, display_name: str, *, caller: Caller | None = None
    ) -> TenantRecord:
        check_platform_admin(caller, "creating a tenant")
        check_name("tenant", name)
        if len(display_name) > MAX_DISPLAY_NAME:
            raise InvalidArgument(f"display_name is longer than {MAX_DISPLAY_NAME} characters")
        tenant = TenantRecord(name, display_name, utc_now())
        await asyncio.to_thread(self.store.create_tenant, tenant)
        log.info("tenant created", extra={"tenant": name})
        return tenant

    async def get_tenant(self, name: str, *, caller: Caller | None = None) -> TenantRecord:
        check_name("tenant", name)
        _check_reach(caller, name, "reading tenant")
        tenant = await asyncio.to_thread(self.store.get_tenant, name)
        if tenant is None:
            raise NotFound(f"tenant {name!r} not found")
        return tenant

    async def list_tenants(
        self, page_size: int, page_token: str, *, caller: Caller | None = None
    ) -> tuple[list[TenantRecord], str]:
        """Every tenant for a platform admin; only its own for anyone else."""
        page = Page.parse(page_size, page_token)
        if caller is not None and not caller.is_platform_admin:
            own = await self.get_tenant(caller.tenant)
            return ([own] if own.name > page.after else []), ""
        found = await asyncio.to_thread(self.store.list_tenants, page.after, page.size)
        return found, _next_token(found, page, lambda t: t.name)

    async def create_key(
        self, tenant: str, role: Role | None, description: str, *, caller: Caller | None = None
    ) -> CreatedKey:
        """Any role, admin included, in the caller's own tenant; a platform admin in any tenant."""
        check_name("tenant", tenant)
        _check_reach(caller, tenant, "creating API keys in tenant")
        if role is None:
            raise InvalidArgument("role is required: ROLE_READER, ROLE_DEVELOPER or ROLE_ADMIN")
        if len(description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION} characters")
        await self.get_tenant(tenant)
        new = generate_key()
        key = KeyRecord(
            id=new.id,
            tenant=tenant,
            role=role,
            secret_hash=new.secret_hash,
            description=description,
            revoked=False,
            create_time=utc_now(),
            revoke_time=None,
        )
        await asyncio.to_thread(self.store.create_key, key)
        log.info("api key created", extra={"key_id": key.id, "tenant": tenant, "role": role.name.lower()})
        return CreatedKey(key, new.plaintext)

    async def list_keys(
        self, tenant: str, page_size: int, page_token: str, *, caller: Caller | None = None
    ) -> tuple[list[KeyRecord], str]:
        """Keys of one tenant; `tenant` empty: of every tenant for a platform admin, else the caller's."""
        page = Page.parse(page_size, page_token)
        if caller is not None and not caller.is_platform_admin:
            tenant = tenant or caller.tenant
            _check_reach(caller, tenant, "listing the API keys of tenant")
        if tenant:
            await self.get_tenant(tenant)
        found = await asyncio.to_thread(self.store.list_keys, tenant or None, page.after, page.size)
        return found, _next_token(found, page, lambda k: k.id)

    async def revoke_key(self, key_id: str, *, caller: Caller | None = None) -> KeyRecord:
        """Idempotent: revoking a revoked key returns it unchanged."""
        key_id = await self._resolve_key_id(caller, key_id)
        key = await asyncio.to_thread(self.store.revoke_key, key_id, utc_now())
        if key is None:
            raise NotFound(f"API key {key_id[:80]!r} not found")
        self.on_revoke(key.id)
        log.info("api key revoked", extra={"key_id": key.id, "tenant": key.tenant})
        return key

    async def get_key(self, key_id: str) -> KeyRecord:
        key = await asyncio.to_thread(self.store.get_key, key_id)
        if key is None:
            raise NotFound(f"API key {key_id[:80]!r} not found")
        return key

    async def _resolve_key_id(self, caller: Caller | None, key_id: str) -> str:
        """The whole id of the key `key_id` names (it or a unique prefix of it) among the keys in
        the caller's reach: another tenant's key is NOT_FOUND to a tenant admin, exactly like a
        missing one, and never makes a prefix ambiguous."""
        if not key_id:
            raise InvalidArgument("id is required: the key's public id, as ListApiKeys shows it")
        check_id_prefix("API key id", key_id)
        tenant = None if caller is None or caller.is_platform_admin else caller.tenant
        found = await asyncio.to_thread(self.store.key_ids_starting_with, key_id, tenant, MATCHES_NAMED + 1)
        return one_match("API key", key_id, found, f" in tenant {tenant!r}" if tenant else "")

    async def set_key_rate_limit(
        self, key_id: str, rate_limit: RateLimit | None, *, caller: Caller | None = None
    ) -> KeyRecord:
        key_id = await self._resolve_key_id(caller, key_id)
        if rate_limit is not None:
            check_rate_limit(rate_limit)
        key = await asyncio.to_thread(self.store.set_key_rate_limit, key_id, rate_limit)
        if key is None:
            raise NotFound(f"API key {key_id[:80]!r} not found")
        self.on_revoke(key.id)
        log.info("api key rate limit set", extra={"key_id": key.id, "rate_limit": str(rate_limit)})
        return key

    async def set_quota(
        self, quota: QuotaRecord, fields: Collection[str] = (), *, caller: Caller | None = None
    ) -> QuotaRecord:
        """Platform admins only: a tenant must not lift its own quota. With `fields` (the paths of
        an update mask) only those change; the rest keep their stored values."""
        check_platform_admin(caller, "setting a quota")
        await self.get_tenant(quota.tenant)
        columns = None
        if fields:
            current = await asyncio.to_thread(self.store.get_quota, quota.tenant)
            quota = merged_quota(current or QuotaRecord(quota.tenant), quota, set(fields))
            columns = quota_columns(set(fields))
        check_rate_limit(quota.rate_limit)
        for name in QUOTA_FIELDS:
            if getattr(quota, name) > MAX_BUDGET:
                raise InvalidArgument(f"{name} is larger than {MAX_BUDGET}; use 0 for unlimited")
        if quota.max_replicas > MAX_REPLICAS:
            raise InvalidArgument(
                f"max_replicas is larger than {MAX_REPLICAS}; use 0 for the service's default"
            )
        quota = dataclasses.replace(quota, update_time=utc_now())
        await asyncio.to_thread(self.store.set_quota, quota, columns)
        if self.quotas is not None:
            self.quotas.forget(quota.tenant)
        log.info("quota set", extra={"tenant": quota.tenant, "quota": str(quota)})
        return quota

    async def get_quota(self, tenant: str, *, caller: Caller | None = None) -> QuotaRecord:
        check_name("tenant", tenant)
        _check_reach(caller, tenant, "reading the quota of tenant")
        await self.get_tenant(tenant)
        return await asyncio.to_thread(self.store.get_quota, tenant) or QuotaRecord(tenant)

    async def get_usage(
        self, tenant: str, key_id: str, start_day: str, end_day: str, *, caller: Caller
    ) -> list[UsageRecord]:
        """A tenant's usage by day; any role may read its own tenant's, a platform admin any tenant's."""
        tenant = tenant or caller.tenant
        check_name("tenant", tenant)
        _check_reach(caller, tenant, "reading the usage of tenant")
        last = _day("end_day", end_day) if end_day else utc_now().date()
        first = _day("start_day", start_day) if start_day else last - timedelta(days=DEFAULT_USAGE_DAYS - 1)
        if first > last:
            raise InvalidArgument(f"start_day {first} is after end_day {last}")
        if (last - first).days >= MAX_USAGE_DAYS:
            raise InvalidArgument(f"ask for at most {MAX_USAGE_DAYS} days at a time")
        if self.meter is not None:
            await self.meter.flush()
        return await asyncio.to_thread(
            self.store.get_usage, tenant, key_id, first.isoformat(), last.isoformat()
        )

    async def list_audit_events(
        self, where: AuditFilter, page_size: int, page_token: str, *, caller: Caller | None = None
    ) -> tuple[list[AuditRecord], str]:
        """Every tenant's events for a platform admin; only its own tenant's for anyone else."""
        page = Page.parse(page_size, page_token)
        if caller is not None and not caller.is_platform_admin:
            _check_reach(caller, where.tenant or caller.tenant, "reading the audit events of tenant")
            where = dataclasses.replace(where, tenant=caller.tenant)
        if where.start_time and where.end_time and where.start_time >= where.end_time:
            raise InvalidArgument("start_time must be before end_time")
        if self.audit is not None:
            await self.audit.flush()
        found = await asyncio.to_thread(self.store.list_audit_events, where, page.after, page.size)
        return found, _next_token(found, page, lambda e: e.id)

    async def bootstrap_admin(self, key_file: Path, force: bool = False) -> KeyRecord | None:
        """Issue the first ADMIN key into `key_file` (mode 0600) unless an active one exists.

        Idempotent, so `maas up` calls it on every start. `force` issues another admin key
        anyway: the recovery path when the key file was lost.
        """
        existing = await asyncio.to_thread(self.store.active_admin_key_ids)
        if existing and not force:
            if not key_file.exists():
                log.warning(
                    "admin key file is missing but active admin keys exist; use one of them, or issue "
                    "a new one with `python -m services.gateway bootstrap-admin --key-file PATH --force`",
                    extra={"key_file": str(key_file), "admin_key_ids": existing},
                )
            return None
        if await asyncio.to_thread(self.store.get_tenant, ADMIN_TENANT) is None:
            await self.create_tenant(ADMIN_TENANT, "Platform administrators")
        created = await self.create_key(ADMIN_TENANT, Role.ADMIN, "bootstrap admin key")
        await asyncio.to_thread(write_secret_file, key_file, created.plaintext + "\n")
        log.info("admin key written", extra={"key_id": created.key.id, "key_file": str(key_file)})
        return created.key


def check_platform_admin(caller: Caller | None, action: str) -> None:
    if caller is not None and not caller.is_platform_admin:
        raise PermissionDenied(_needs_platform_admin(caller, action))


def _check_reach(caller: Caller | None, tenant: str, action: str) -> None:
    """A platform admin reaches every tenant; any other caller only its own."""
    if caller is not None and not caller.is_platform_admin and tenant != caller.tenant:
        raise PermissionDenied(_needs_platform_admin(caller, f"{action} {tenant[:80]!r}"))


def _needs_platform_admin(caller: Caller, action: str) -> str:
    return (
        f"{action} needs a platform admin key (an admin key of tenant {ADMIN_TENANT!r}); "
        f"API key {caller.key_id} is a {caller.role.name.lower()} key of tenant {caller.tenant!r}"
    )


def write_secret_file(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`, readable by the owner only from the first byte."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def merged_quota(current: QuotaRecord, given: QuotaRecord, paths: set[str]) -> QuotaRecord:
    """`current` with the fields that `paths` name taken from `given`."""
    if unknown := paths - QUOTA_PATHS:
        raise InvalidArgument(f"cannot set {sorted(unknown)}; update_mask paths are {sorted(QUOTA_PATHS)}")
    budgets = {name: getattr(given if name in paths else current, name) for name in QUOTA_BUDGETS}
    rate_limit = {
        name: getattr((given if {"rate_limit", f"rate_limit.{name}"} & paths else current).rate_limit, name)
        for name in RATE_FIELDS
    }
    return QuotaRecord(current.tenant, **budgets, rate_limit=RateLimit(**rate_limit))


def quota_columns(paths: set[str]) -> set[str]:
    """The store's columns that the update-mask `paths` name."""
    rate = {name for name in RATE_FIELDS if {"rate_limit", f"rate_limit.{name}"} & paths}
    return (paths & set(QUOTA_BUDGETS)) | {f"rate_{name}" for name in rate}


def check_rate_limit(rate_limit: RateLimit) -> None:
    rps = rate_limit.requests_per_second
    if not math.isfinite(rps) or rps < 0 or rps > MAX_RATE:
        raise InvalidArgument(f"requests_per_second must be between 0 (unlimited) and {MAX_RATE:g}")
    if rate_limit.burst > MAX_BURST:
        raise InvalidArgument(f"burst must be at most {MAX_BURST}")
    if rate_limit.tokens_per_minute > MAX_BUDGET:
        raise InvalidArgument(f"tokens_per_minute must be at most {MAX_BUDGET}; use 0 for unlimited")
    if rate_limit.burst and not rps:
        raise InvalidArgument("burst needs requests_per_second: a burst of an unlimited rate means nothing")


def _day(field: str, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidArgument(f"{field} {value[:20]!r} is not a day: write YYYY-MM-DD (UTC)") from None


def _next_token(found: list[T], page: Page, key_of: Callable[[T], str]) -> str:
    return Page.token_after(key_of(found[-1])) if len(found) == page.size else ""
