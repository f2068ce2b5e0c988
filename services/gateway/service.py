"""Tenants and API keys: the gateway's own domain logic (no gRPC here)."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from services.common.errors import InvalidArgument, NotFound
from services.common.validation import Page, check_name
from services.gateway.keys import Role, generate_key
from services.gateway.store import GatewayStore, KeyRecord, TenantRecord, utc_now

log = logging.getLogger(__name__)
T = TypeVar("T")

ADMIN_TENANT = "admin"
MAX_DISPLAY_NAME = 256
MAX_DESCRIPTION = 1024


@dataclass(frozen=True)
class CreatedKey:
    key: KeyRecord
    plaintext: str


class Admin:
    def __init__(self, store: GatewayStore, on_revoke: Callable[[str], None] = lambda key_id: None) -> None:
        self.store = store
        # Lets this gateway's auth cache forget a revoked key at once instead of within its TTL.
        self.on_revoke = on_revoke

    async def create_tenant(self, name: str, display_name: str) -> TenantRecord:
        check_name("tenant", name)
        if len(display_name) > MAX_DISPLAY_NAME:
            raise InvalidArgument(f"display_name is longer than {MAX_DISPLAY_NAME} characters")
        tenant = TenantRecord(name, display_name, utc_now())
        await asyncio.to_thread(self.store.create_tenant, tenant)
        log.info("tenant created", extra={"tenant": name})
        return tenant

    async def get_tenant(self, name: str) -> TenantRecord:
        check_name("tenant", name)
        tenant = await asyncio.to_thread(self.store.get_tenant, name)
        if tenant is None:
            raise NotFound(f"tenant {name!r} not found")
        return tenant

    async def list_tenants(self, page_size: int, page_token: str) -> tuple[list[TenantRecord], str]:
        page = Page.parse(page_size, page_token)
        found = await asyncio.to_thread(self.store.list_tenants, page.after, page.size)
        return found, _next_token(found, page, lambda t: t.name)

    async def create_key(self, tenant: str, role: Role | None, description: str) -> CreatedKey:
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

    async def list_keys(self, tenant: str, page_size: int, page_token: str) -> tuple[list[KeyRecord], str]:
        """Keys of one tenant, or of every tenant when `tenant` is empty."""
        page = Page.parse(page_size, page_token)
        if tenant:
            await self.get_tenant(tenant)
        found = await asyncio.to_thread(self.store.list_keys, tenant or None, page.after, page.size)
        return found, _next_token(found, page, lambda k: k.id)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        """Idempotent: revoking a revoked key returns it unchanged."""
        if not key_id:
            raise InvalidArgument("id is required: the key's public id, as ListApiKeys shows it")
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


def _next_token(found: list[T], page: Page, key_of: Callable[[T], str]) -> str:
    return Page.token_after(key_of(found[-1])) if len(found) == page.size else ""
