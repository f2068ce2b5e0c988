"""`maas whoami` and `maas admin ...`: tenants, API keys, quotas and the audit log."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from maas.cli._shared import AddressOption, ApiKeyOption, client, console, errors, fail
from maas.client import ROLES
from maas.errors import ApiError
from maas.gateway.v1 import admin_pb2

admin_app = typer.Typer(
    help=(
        "Tenants, API keys, quotas and the audit log. A tenant's admin key manages that tenant's keys "
        "and reads its quota, usage and audit; tenants, quotas and other tenants need a platform admin "
        "key (an admin key of tenant 'admin', as `maas up` writes to .maas/admin.key)."
    ),
    no_args_is_help=True,
)


def whoami(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Show the tenant and role of the API key in use."""
    try:
        key = client(api_key, address).whoami()
    except ApiError as error:
        raise fail(error) from None
    role = {v: k for k, v in ROLES.items()}.get(key.role, "?")
    console.print(f"key {key.id}: tenant [bold]{key.tenant}[/], role {role}")


tenant_app = typer.Typer(help="Tenants.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
quota_app = typer.Typer(help="Quotas and tenant-wide rate limits (0 = unlimited).", no_args_is_help=True)
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(key_app, name="key")
admin_app.add_typer(quota_app, name="quota")


@tenant_app.command("create")
def tenant_create(
    name: str, display_name: str = "", api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """Create a tenant (platform admin key)."""
    try:
        tenant = client(api_key, address).create_tenant(name, display_name)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"created tenant [bold]{tenant.name}[/]")


@tenant_app.command("list")
def tenant_list(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Every tenant with a platform admin key; a tenant admin sees its own."""
    try:
        tenants = client(api_key, address).list_tenants()
    except ApiError as error:
        raise fail(error) from None
    table = Table("tenant", "display name", "created")
    for tenant in tenants:
        table.add_row(tenant.name, tenant.display_name, tenant.create_time.ToJsonString())
    console.print(table)


@key_app.command("create")
def key_create(
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for")],
    role: Annotated[str, typer.Option(help="reader, developer or admin")] = "developer",
    description: str = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Create a key; the plaintext is printed once and never stored."""
    if role not in ROLES:
        raise typer.BadParameter(f"role must be one of {', '.join(ROLES)}")
    try:
        record, plaintext = client(api_key, address).create_api_key(tenant, role, description)
    except ApiError as error:
        raise fail(error) from None
    errors.print(f"key {record.id} for tenant {record.tenant} ({role}); store it now, it is not shown again:")
    print(plaintext)


@key_app.command("list")
def key_list(
    tenant: Annotated[
        str, typer.Argument(help="Default: your own tenant; every tenant with a platform admin key")
    ] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    try:
        keys = client(api_key, address).list_api_keys(tenant)
    except ApiError as error:
        raise fail(error) from None
    roles = {v: k for k, v in ROLES.items()}
    table = Table("id", "tenant", "role", "revoked", "description", "created")
    for key in keys:
        table.add_row(
            key.id,
            key.tenant,
            roles.get(key.role, "?"),
            "yes" if key.revoked else "",
            key.description,
            key.create_time.ToJsonString(),
        )
    console.print(table)


@key_app.command("revoke")
def key_revoke(key_id: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        client(api_key, address).revoke_api_key(key_id)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"revoked {key_id}")


@key_app.command("limit")
def key_limit(
    key_id: str,
    rps: Annotated[float, typer.Option(help="Requests per second; 0 = unlimited")] = 0.0,
    burst: Annotated[int, typer.Option(help="Calls allowed at once (default: max(1, rps))")] = 0,
    tokens_per_minute: Annotated[int, typer.Option(help="Generated tokens per minute; 0 = unlimited")] = 0,
    clear: Annotated[
        bool, typer.Option(help="Drop the key's own limit: the gateway default applies")
    ] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Set (or --clear) one key's own rate limit."""
    try:
        key = client(api_key, address).set_api_key_rate_limit(
            key_id, None if clear else rps, burst, tokens_per_minute
        )
    except ApiError as error:
        raise fail(error) from None
    if key.HasField("rate_limit"):
        limit = key.rate_limit
        console.print(
            f"key {key.id}: {limit.requests_per_second:g} req/s, burst {limit.burst}, "
            f"{limit.tokens_per_minute} tokens/min"
        )
    else:
        console.print(f"key {key.id}: the gateway's default limit applies")


QUOTA_OPTIONS = (
    "requests_per_day",
    "requests_per_month",
    "tokens_per_day",
    "tokens_per_month",
    "training_minutes_per_day",
    "training_minutes_per_month",
)


@quota_app.command("set")
def quota_set(
    tenant: str,
    requests_per_day: int = 0,
    requests_per_month: int = 0,
    tokens_per_day: int = 0,
    tokens_per_month: int = 0,
    training_minutes_per_day: int = 0,
    training_minutes_per_month: int = 0,
    rps: Annotated[float, typer.Option(help="Tenant-wide requests per second")] = 0.0,
    burst: int = 0,
    tokens_per_minute: int = 0,
    max_replicas: Annotated[
        int, typer.Option(min=0, help="Replicas its deployments may reserve together; 0: the service's default")
    ] = 0,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Replace a tenant's quota (platform admin key): every budget not given becomes unlimited
    (the replica budget: the service's default)."""
    quota = admin_pb2.Quota(
        tenant=tenant,
        requests_per_day=requests_per_day,
        requests_per_month=requests_per_month,
        tokens_per_day=tokens_per_day,
        tokens_per_month=tokens_per_month,
        training_minutes_per_day=training_minutes_per_day,
        training_minutes_per_month=training_minutes_per_month,
        rate_limit=admin_pb2.RateLimit(
            requests_per_second=rps, burst=burst, tokens_per_minute=tokens_per_minute
        ),
        max_replicas=max_replicas,
    )
    try:
        saved = client(api_key, address).set_quota(quota)
    except ApiError as error:
        raise fail(error) from None
    _print_quota(saved)


@quota_app.command("get")
def quota_get(tenant: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Show a tenant's quota and rate limit."""
    try:
        quota = client(api_key, address).get_quota(tenant)
    except ApiError as error:
        raise fail(error) from None
    _print_quota(quota)


def _print_quota(quota) -> None:  # type: ignore[no-untyped-def]
    table = Table("budget", "limit", title=f"quota of tenant {quota.tenant}")
    for name in QUOTA_OPTIONS:
        value = getattr(quota, name)
        table.add_row(name.replace("_", " "), f"{value:,}" if value else "unlimited")
    rate = quota.rate_limit
    table.add_row(
        "requests per second", f"{rate.requests_per_second:g}" if rate.requests_per_second else "unlimited"
    )
    table.add_row("burst", str(rate.burst) if rate.burst else "default")
    table.add_row(
        "tokens per minute", f"{rate.tokens_per_minute:,}" if rate.tokens_per_minute else "unlimited"
    )
    table.add_row("max replicas", str(quota.max_replicas) if quota.max_replicas else "service default")
    console.print(table)


@admin_app.command("audit")
def audit(
    tenant: str = "",
    key: Annotated[str, typer.Option("--key", help="Only this API key id")] = "",
    method: Annotated[str, typer.Option(help="A method name such as DeleteModel")] = "",
    limit: int = 50,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """The newest audit events (mutating calls through the gateway); a tenant admin sees its own tenant's."""
    try:
        events = client(api_key, address).list_audit_events(tenant, key, method, limit)
    except ApiError as error:
        raise fail(error) from None
    table = Table("time", "tenant", "key", "method", "resource", "outcome")
    for event in events:
        table.add_row(
            event.time.ToJsonString(),
            event.tenant,
            event.api_key_id,
            event.method.rpartition("/")[2],
            event.resource,
            event.code,
        )
    console.print(table)
