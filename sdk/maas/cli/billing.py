"""`maas billing ...`: prices, plans, invoices, credit notes, spend and budgets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.table import Column
from rich.text import Text

from maas.cli._shared import (
    AddressOption,
    ApiKeyOption,
    JsonOption,
    client,
    console,
    fail,
    id_column,
    new_table,
    print_json,
    print_json_list,
)
from maas.errors import ApiError
from maas.gateway.v1 import billing_pb2

billing_app = typer.Typer(
    help=(
        "Prices, plans, invoices and budgets. Any key lists prices and plans; a tenant's admin key reads "
        "its own invoices and spend; the rest needs a platform admin key. Quantities are in each "
        "resource's base unit: requests, tokens, seconds, byte-days (storage), replica-seconds."
    ),
    no_args_is_help=True,
)
price_app = typer.Typer(help="The price book.", no_args_is_help=True)
plan_app = typer.Typer(help="Plans with monthly allowances, and tenants' plans.", no_args_is_help=True)
budget_app = typer.Typer(help="Monthly budgets (alerts at 80 % and 100 %).", no_args_is_help=True)
billing_app.add_typer(price_app, name="price")
billing_app.add_typer(plan_app, name="plan")
billing_app.add_typer(budget_app, name="budget")

TierOption = Annotated[
    str,
    typer.Option("--tier", help="fp32, fp16, int8 or distilled; default: every tier without its own price"),
]


@price_app.command("set")
def price_set(
    resource: Annotated[
        str,
        typer.Argument(
            help="requests, input_tokens, output_tokens, embedding_tokens, "
            "training_cpu_seconds, training_gpu_seconds, storage_byte_days, "
            "replica_seconds"
        ),
    ],
    amount: Annotated[
        str,
        typer.Argument(
            help="Per 1000 requests or tokens, CPU- or GPU-second, GB-month, replica-hour, e.g. 0.40"
        ),
    ],
    tier: TierOption = "",
    effective: Annotated[
        str, typer.Option(help="First UTC day it applies to, YYYY-MM-DD (default: today)")
    ] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Set a price from a day on; usage of earlier days keeps the price of its day."""
    try:
        price = client(api_key, address).set_price(resource, amount, tier=tier, effective_day=effective)
    except ApiError as error:
        raise fail(error) from None
    console.print(
        f"{_named(price.resource, price.tier)}: {price.amount} {price.currency} per {price.unit} "
        f"from {price.effective_day}"
    )


@price_app.command("list")
def price_list(
    superseded: Annotated[bool, typer.Option("--all", help="Also the prices later ones replaced")] = False,
    as_json: JsonOption = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """The prices in force today and those scheduled after it."""
    try:
        book = client(api_key, address).list_prices(superseded)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(book.prices)
        return
    if not book.prices:
        console.print(f"no prices yet: nothing is billed (currency {book.currency})")
        return
    table = new_table(
        id_column("resource", (p.resource for p in book.prices)),
        "tier",
        f"{book.currency}",
        "per",
        "from",
        "",
    )
    for price in book.prices:
        table.add_row(
            price.resource,
            price.tier or "any",
            price.amount,
            price.unit,
            price.effective_day,
            "scheduled" if price.scheduled else "",
        )
    console.print(table)


@plan_app.command("define")
def plan_define(
    name: str,
    include: Annotated[
        list[str] | None,
        typer.Option("--include", help="RESOURCE[/TIER]=QUANTITY included per month, e.g. requests=10000"),
    ] = None,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Define a plan (plans never change: define another to change allowances)."""
    allowances: dict[str, int] = {}
    for item in include or []:
        named, _, quantity = item.partition("=")
        if not named or not quantity.isdigit():
            raise typer.BadParameter(
                f"--include {item!r}: write RESOURCE[/TIER]=QUANTITY, e.g. requests=10000"
            )
        allowances[named] = int(quantity)
    try:
        plan = client(api_key, address).define_plan(name, allowances)
    except ApiError as error:
        raise fail(error) from None
    console.print(Text.assemble("plan ", (plan.name, "bold"), f": {_allowances(plan)}"))


@plan_app.command("list")
def plan_list(
    as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    try:
        plans = client(api_key, address).list_plans()
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json_list(plans)
        return
    table = new_table(
        id_column("plan", (p.name for p in plans)), Column("included per month", overflow="fold")
    )
    for plan in plans:
        table.add_row(plan.name, _allowances(plan))
    console.print(table)


@plan_app.command("set")
def plan_set(
    tenant: str,
    plan: str,
    start: Annotated[
        str, typer.Option("--from", help="First month, YYYY-MM (default: the current one)")
    ] = "",
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Put a tenant on a plan from the first day of a month."""
    try:
        assigned = client(api_key, address).set_tenant_plan(tenant, plan, start)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"tenant {assigned.tenant} is on plan {assigned.plan} from {assigned.start_month}")


@billing_app.command("invoice")
def invoice(
    tenant: str,
    month: Annotated[str, typer.Option(help="YYYY-MM (UTC; default: the current month)")] = "",
    finalize: Annotated[
        bool, typer.Option("--finalize", help="Store and number it (a month that is over)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the invoice as JSON")] = False,
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """A month's invoice: computed from the recorded usage, or as stored once finalized."""
    month = month or datetime.now(UTC).strftime("%Y-%m")
    maas = client(api_key, address)
    try:
        found = maas.finalize_invoice(tenant, month) if finalize else maas.get_invoice(tenant, month)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print(json.dumps(invoice_json(found), indent=2))
        return
    _print_invoice(found)


@billing_app.command("credit")
def credit(
    tenant: str,
    invoice_number: Annotated[str, typer.Option("--invoice", help="The finalized invoice's number")],
    amount: Annotated[str, typer.Option(help="How much to credit, e.g. 12.50")],
    reason: Annotated[str, typer.Option(help="Why the invoice is corrected")],
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Correct a finalized invoice with a credit note (invoices never change)."""
    try:
        note = client(api_key, address).create_credit_note(tenant, invoice_number, amount, reason)
    except ApiError as error:
        raise fail(error) from None
    console.print(f"credit note {note.number}: {note.amount} against {note.invoice_number}")


@billing_app.command("spend")
def spend(
    tenant: str, as_json: JsonOption = False, api_key: ApiKeyOption = None, address: AddressOption = None
) -> None:
    """The current month so far, a forecast for the whole month and the budget."""
    try:
        found = client(api_key, address).get_spend(tenant)
    except ApiError as error:
        raise fail(error) from None
    if as_json:
        print_json(found)
        return
    console.print(
        f"{found.tenant}, {found.month} (day {found.days_elapsed} of {found.days_in_month}): "
        f"{found.month_to_date} {found.currency} so far, forecast {found.forecast} {found.currency}"
    )
    if found.budget:
        console.print(f"budget {found.budget} {found.currency}: {found.budget_used_ratio:.0%} used")
    else:
        console.print("no budget (maas billing budget set TENANT AMOUNT)")


@budget_app.command("set")
def budget_set(
    tenant: str,
    amount: Annotated[str, typer.Argument(help="Per month, e.g. 500.00; 0 removes the budget")],
    api_key: ApiKeyOption = None,
    address: AddressOption = None,
) -> None:
    """Set a tenant's monthly budget."""
    try:
        budget = client(api_key, address).set_budget(tenant, amount)
    except ApiError as error:
        raise fail(error) from None
    if budget.amount:
        console.print(f"budget of {budget.tenant}: {budget.amount} {budget.currency} per month")
    else:
        console.print(f"budget of {budget.tenant} removed")


def invoice_json(found: billing_pb2.Invoice) -> dict[str, Any]:
    """The invoice as `--json` prints it: amounts as decimal strings, quantities as integers."""
    return {
        "tenant": found.tenant,
        "month": found.month,
        "currency": found.currency,
        "lines": [_line_json(line) for line in found.lines],
        "subtotal": found.subtotal,
        "allowances": found.allowances,
        "total": found.total,
        "number": found.number,
        "finalized": found.finalized,
        "finalize_time": found.finalize_time.ToJsonString() if found.finalized else None,
        "plan": found.plan,
        "included": [_line_json(line) for line in found.included],
        "unpriced": [
            {"resource": u.resource, "tier": u.tier, "quantity": u.quantity} for u in found.unpriced
        ],
        "credit_notes": [
            {
                "number": n.number,
                "amount": n.amount,
                "reason": n.reason,
                "create_time": n.create_time.ToJsonString(),
            }
            for n in found.credit_notes
        ],
        "balance": found.balance,
    }


def _line_json(line: billing_pb2.InvoiceLine) -> dict[str, Any]:
    return {
        "resource": line.resource,
        "tier": line.tier,
        "quantity": line.quantity,
        "unit_price": line.unit_price,
        "amount": line.amount,
        "unit": line.unit,
        "first_day": line.first_day,
        "last_day": line.last_day,
    }


def _print_invoice(found: billing_pb2.Invoice) -> None:
    state = f"{found.number}, finalized" if found.finalized else "draft: the month as it stands now"
    plan = f", plan {found.plan}" if found.plan else ""
    table = new_table(
        id_column("resource", (line.resource for line in found.lines)),
        "tier",
        Column("quantity", justify="right"),
        Column("price", overflow="fold"),
        Column("days", no_wrap=True),
        Column(found.currency, justify="right", no_wrap=True),
        title=f"invoice of {found.tenant} for {found.month} ({state}{plan})",
    )
    for line in found.lines:
        table.add_row(
            line.resource,
            line.tier,
            f"{line.quantity:,}",
            f"{line.unit_price}/{line.unit}",
            f"{line.first_day[5:]}..{line.last_day[5:]}",
            line.amount,
        )
    console.print(table)
    covered = f"-{found.allowances}" if Decimal(found.allowances) else found.allowances
    console.print(f"subtotal {found.subtotal}, allowances {covered}, total {found.total} {found.currency}")
    for item in found.unpriced:
        console.print(f"not billed, no price: {_named(item.resource, item.tier)} {item.quantity:,}")
    for note in found.credit_notes:
        console.print(f"credit note {note.number}: -{note.amount} ({note.reason})")
    if found.credit_notes:
        console.print(f"balance {found.balance} {found.currency}")


def _named(resource: str, tier: str) -> str:
    return f"{resource}/{tier}" if tier else resource


def _allowances(plan: billing_pb2.Plan) -> str:
    return (
        ", ".join(f"{_named(a.resource, a.tier)}={a.quantity:,}" for a in plan.allowances)
        or "nothing included"
    )
