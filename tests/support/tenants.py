"""Tenants with their own developer keys on a running stack, for tests of what one tenant can
do to another."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from maas import Client

from services.stack.ephemeral import EphemeralStack


@contextlib.contextmanager
def developer_clients(stack: EphemeralStack, *tenants: str) -> Iterator[dict[str, Client]]:
    """Create each tenant and yield a client per tenant, holding a developer key of it."""
    admin = Client(stack.gateway, stack.admin_key)
    clients = {}
    try:
        for tenant in tenants:
            admin.create_tenant(tenant)
            clients[tenant] = Client(stack.gateway, admin.create_api_key(tenant, "developer")[1])
        yield clients
    finally:
        for client in (*clients.values(), admin):
            client.close()
