"""`maas usage`: what a tenant (or one key) used, by UTC day."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from maas.cli._shared import AddressOption, ApiKeyOption, client, console, fail
from maas.errors import ApiError

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
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Show usage by day: requests, cache hits, errors, bytes, tokens, training seconds."""
    try:
        rows = client(api_key, address).get_usage(tenant, key, start, end)
    except ApiError as error:
        raise fail(error) from None
    table = Table("day", *(name.replace("_", " ") for name in COLUMNS), title=_title(tenant, key))
    for row in rows:
        table.add_row(row.day, *(f"{getattr(row, name):,}" for name in COLUMNS))
    if not rows:
        console.print("no usage in that range")
        return
    console.print(table)


def _title(tenant: str, key: str) -> str:
    who = f"tenant {tenant}" if tenant else "your tenant"
    return f"usage of {who}" + (f", key {key}" if key else "")
