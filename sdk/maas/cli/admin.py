"""`maas whoami` and `maas admin ...`: tenants, API keys, quotas and the audit log."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Column
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    JsonOption,
    client,
    console,
    errors,
    fail,
    id_column,
    new_table,
    print_json,
    print_json_list,
)
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
    console.print(Text.assemble(f"key {key.id}: tenant ", (key.tenant, "bold"), f", role {role}"))


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
    console.print(Text.assemble("created tenant ", (tenant.name, "bold")))


@tenant_app.command("list")
def tenant_list(as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Every tenant with a platform admin key; a tenant admin sees its own."""
    try:
        tenants = client(api_key, address).list_tenants()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(tenants)
        return
    table = new_table(id_column("tenant", (t.name for t in tenants)), "display name", "created")
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
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    try:
        keys = client(api_key, address).list_api_keys(tenant)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(keys)
        return
    roles = {v: k for k, v in ROLES.items()}
    table = new_table(
        id_column("id", (k.id for k in keys)), id_column("tenant", (k.tenant for k in keys)),
        "role", "revoked", "description", "created",
    )
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


KeyIdArgument = Annotated[str, typer.Argument(help="A key id, or a unique prefix of one (at least 4 characters)")]


@key_app.command("revoke")
def key_revoke(key_id: KeyIdArgument, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    try:
        key = client(api_key, address).revoke_api_key(key_id)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"revoked {key.id}")


@key_app.command("limit")
def key_limit(
    key_id: KeyIdArgument,
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


# What `--clear NAME` resets: the option's update-mask paths. A burst without a rate is refused,
# so clearing the rate clears the burst too.
CLEARABLE = {name.replace("_", "-"): [name] for name in (*QUOTA_OPTIONS, "max_replicas")} | {
    "rps": ["rate_limit.requests_per_second", "rate_limit.burst"],
    "burst": ["rate_limit.burst"],
    "tokens-per-minute": ["rate_limit.tokens_per_minute"],
}


@quota_app.command("set")
def quota_set(
    tenant: str,
    requests_per_day: int | None = None,
    requests_per_month: int | None = None,
    tokens_per_day: int | None = None,
    tokens_per_month: int | None = None,
    training_minutes_per_day: int | None = None,
    training_minutes_per_month: int | None = None,
    rps: Annotated[float | None, typer.Option(help="Tenant-wide requests per second")] = None,
    burst: int | None = None,
    tokens_per_minute: int | None = None,
    max_replicas: Annotated[
        int | None,
        typer.Option(min=0, help="Replicas its deployments may reserve together; 0: the service's default"),
    ] = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(
            "--clear",
            metavar="NAME",
            help=f"Reset a budget to unlimited or its default (repeatable): {', '.join(CLEARABLE)}",
        ),
    ] = None,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Change a tenant's quota (platform admin key): only the budgets given or cleared change,
    then the whole quota is shown."""
    budgets = {
        "requests_per_day": requests_per_day,
        "requests_per_month": requests_per_month,
        "tokens_per_day": tokens_per_day,
        "tokens_per_month": tokens_per_month,
        "training_minutes_per_day": training_minutes_per_day,
        "training_minutes_per_month": training_minutes_per_month,
        "max_replicas": max_replicas,
    }
    rate = {"requests_per_second": rps, "burst": burst, "tokens_per_minute": tokens_per_minute}
    budgets = {name: value for name, value in budgets.items() if value is not None}
    rate = {name: value for name, value in rate.items() if value is not None}
    given = [*budgets, *(f"rate_limit.{name}" for name in rate)]
    cleared = []
    for name in clear or []:
        if name.replace("_", "-") not in CLEARABLE:
            raise typer.BadParameter(f"{name!r}; choose from {', '.join(CLEARABLE)}", param_hint="--clear")
        cleared += CLEARABLE[name.replace("_", "-")]
    if both := set(given) & set(cleared):
        raise typer.BadParameter(f"{', '.join(sorted(both))} is both given and cleared", param_hint="--clear")
    if not given and not cleared:
        raise typer.BadParameter("give at least one budget to set, or --clear NAME", param_hint="options")
    # The cleared fields are sent as zero (unlimited) under the mask; the unnamed ones keep their values.
    quota = admin_pb2.Quota(tenant=tenant, **budgets, rate_limit=admin_pb2.RateLimit(**rate))
    try:
        saved = client(api_key, address).set_quota(quota, [*given, *cleared])
    except ApiError as error:
        raise fail(error) from None
    _print_quota(saved)


@quota_app.command("get")
def quota_get(
    tenant: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """Show a tenant's quota and rate limit."""
    try:
        quota = client(api_key, address).get_quota(tenant)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(quota)
        return
    _print_quota(quota)


def _print_quota(quota) -> None:  # type: ignore[no-untyped-def]
    table = new_table("budget", "limit", title=f"quota of tenant {quota.tenant}")
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


@admin_app.command("rotate-kek")
def rotate_kek(as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None) -> None:
    """Give the registry a new key-encryption key: every blob's data key is re-wrapped with it (no
    blob is re-encrypted) and it replaces the KEK file. Platform admin key only. Copy the new KEK
    ($MAAS_HOME/kek) to where you keep it apart from backups, and keep the previous one as long as
    backups taken before this rotation: restoring them needs it."""
    try:
        rotation = client(api_key, address).rotate_kek()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(rotation)
        return
    console.print(
        f"re-wrapped {rotation.rewrapped_keys:,} data key(s) with the new key-encryption key {rotation.kek_id} "
        f"(it replaces {rotation.previous_kek_id})"
    )
    errors.print(
        "copy the new KEK to where you keep it apart from backups; keep the previous one while you keep "
        "backups taken before now",
        style="yellow",
    )


@admin_app.command("audit")
def audit(
    tenant: str = "",
    key: Annotated[str, typer.Option("--key", help="Only this API key id")] = "",
    method: Annotated[str, typer.Option(help="A method name such as DeleteModel")] = "",
    limit: int = 50,
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """The newest audit events (mutating calls and downloads through the gateway, a download with
    the bytes it sent); a tenant admin sees its own tenant's."""
    try:
        events = client(api_key, address).list_audit_events(tenant, key, method, limit)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(events)
        return
    # A resource (a name, an id, a scaling decision) folds onto the next line rather than losing its end.
    table = new_table(
        "time", id_column("tenant", (e.tenant for e in events)), id_column("key", (e.api_key_id for e in events)),
        "method", Column("resource", overflow="fold"), "outcome", Column("bytes", justify="right", no_wrap=True),
    )
    for event in events:
        table.add_row(
            event.time.ToJsonString(),
            event.tenant,
            event.api_key_id,
            event.method.rpartition("/")[2],
            event.resource,
            event.code,
            str(event.bytes) if event.HasField("bytes") else "",
        )
    console.print(table)
