"""`maas whoami` and `maas admin ...`: tenants and API keys."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from maas.cli._shared import AddressOption, ApiKeyOption, client, console, errors, fail
from maas.client import ROLES
from maas.errors import ApiError

admin_app = typer.Typer(help="Tenants and API keys (admin key needed).", no_args_is_help=True)


def whoami(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Show the tenant and role of the API key in use."""
    try:
        key = client(api_key, address).whoami()
    except ApiError as error:
        raise fail(error)
    role = {v: k for k, v in ROLES.items()}.get(key.role, "?")
    console.print(f"key {key.id}: tenant [bold]{key.tenant}[/], role {role}")


tenant_app = typer.Typer(help="Tenants.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(key_app, name="key")


@tenant_app.command("create")
def tenant_create(
    name: str, display_name: str = "", api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    try:
        tenant = client(api_key, address).create_tenant(name, display_name)
    except ApiError as error:
        raise fail(error)
    console.print(f"created tenant [bold]{tenant.name}[/]")


@tenant_app.command("list")
def tenant_list(api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        tenants = client(api_key, address).list_tenants()
    except ApiError as error:
        raise fail(error)
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
        raise fail(error)
    errors.print(f"key {record.id} for tenant {record.tenant} ({role}); store it now, it is not shown again:")
    print(plaintext)


@key_app.command("list")
def key_list(tenant: str, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        keys = client(api_key, address).list_api_keys(tenant)
    except ApiError as error:
        raise fail(error)
    roles = {v: k for k, v in ROLES.items()}
    table = Table("id", "role", "revoked", "description", "created")
    for key in keys:
        table.add_row(
            key.id,
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
        raise fail(error)
    console.print(f"revoked {key_id}")


# --- models ------------------------------------------------------------------------------------
