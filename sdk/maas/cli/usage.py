"""`maas usage`: what a tenant (or one key) used, by UTC day."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated

import typer
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    JsonOption,
    client,
    console,
    fail,
    new_table,
    print_json_list,
)
from maas.client import Client
from maas.errors import ApiError
from maas.gateway.v1 import admin_pb2

# The tenant whose admin keys reach every tenant (the gateway's keys.ADMIN_TENANT).
PLATFORM_TENANT = "admin"
# Days shown when --start is left out, --end included.
DEFAULT_DAYS = 7
COLUMNS = (
    "requests",
    "cache_hits",
    "errors",
    "rejected",
    "input_bytes",
    "output_bytes",
    "tokens",
    "training_seconds",
)


def usage(
    tenant: Annotated[str, typer.Option(help="Tenant (default: the key's own; others need admin)")] = "",
    key: Annotated[str, typer.Option("--key", help="Only this API key id")] = "",
    start: Annotated[str, typer.Option(help="First UTC day, YYYY-MM-DD (default: 6 days before --end)")] = "",
    end: Annotated[str, typer.Option(help="Last UTC day, YYYY-MM-DD (default: today)")] = "",
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Show usage by day: requests, cache hits, errors, bytes, tokens, training seconds."""
    maas = client(api_key, address)
    try:
        rows = maas.get_usage(tenant, key, start, end)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(rows)
        return
    if not rows:
        try:
            console.print(Text(_nothing_used(maas, tenant, key, start, end)))  # --key as typed, not markup
        except ApiError as error:
            raise fail(error) from None
        return
    title = f"usage of {_scope(rows[0].tenant, key)}"
    table = new_table("day", *(name.replace("_", " ") for name in COLUMNS), title=title)
    for row in rows:
        table.add_row(row.day, *(f"{getattr(row, name):,}" for name in COLUMNS))
    console.print(table)


def _scope(tenant: str, key: str) -> str:
    return f"tenant {tenant}" + (f", key {key}" if key else "")


def _nothing_used(maas: Client, tenant: str, key: str, start: str, end: str) -> str:
    """Names the tenant and days looked at: an empty answer for the wrong tenant, as the platform
    admin reading its own by default, would otherwise pass for a quiet week."""
    hint = ""
    if not tenant:
        caller = maas.whoami()
        tenant = caller.tenant
        if tenant == PLATFORM_TENANT and caller.role == admin_pb2.ROLE_ADMIN:
            hint = "; pass --tenant NAME for another tenant's"
    # The server's defaults, as the options' help states them; it has checked the days given.
    last = end or datetime.now(UTC).date().isoformat()
    first = start or (date.fromisoformat(last) - timedelta(days=DEFAULT_DAYS - 1)).isoformat()
    return f"no usage for {_scope(tenant, key)} between {first} and {last}{hint}"
