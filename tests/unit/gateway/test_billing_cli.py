"""Billing through the real gateway and the `maas billing` command line: calls through the
gateway invoiced at the price of the tier that answered them; a past month's invoice from all
three usage sources (the gateway's own metering, the registry's storage samples and the
inference service's replica time, fakes of the last two), tiers priced differently, the
`--json` shape exactly, finalize and credit notes, prices and plans, spend and budgets, and the
CLI's refusals."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import numpy as np
import pytest
from maas.cli import app
from maas.gateway.v1 import billing_pb2
from maas.inference.v1 import inference_pb2
from typer.testing import CliRunner, Result

from services.common.database import make_engine
from services.gateway.billing import Month
from services.gateway.store import BillableRecord, GatewayStore, PriceRecord
from tests.unit.gateway.gateway_fakes import Stack, gateway_stack, route
from tests.unit.gateway.test_billing_permissions import billed_month
from tests.unit.gateway.test_gateway_billable_usage import tiered, wait_for_route
from tests.unit.gateway.test_gateway_metering import predict_request

INVOICE_KEYS = [
    "tenant",
    "month",
    "currency",
    "lines",
    "subtotal",
    "allowances",
    "total",
    "number",
    "finalized",
    "finalize_time",
    "plan",
    "included",
    "unpriced",
    "credit_notes",
    "balance",
]
LINE_KEYS = ["resource", "tier", "quantity", "unit_price", "amount", "unit", "first_day", "last_day"]


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as stack:
        yield stack


def book_month(stack: Stack) -> str:
    """A past month: fp32 requests at 2.00 and int8 at 0.50 per 1000, storage and replica-hours."""
    month = billed_month()
    first = f"{month}-01"
    store = GatewayStore(make_engine(stack.settings.gateway_database_url))
    now = datetime.now(UTC)
    for resource, tier, amount in (
        ("requests", "fp32", "2.00"),
        ("requests", "int8", "0.50"),
        ("storage_byte_days", "", "0.30"),
        ("replica_seconds", "", "0.90"),
    ):
        store.set_price(PriceRecord(resource, tier, first, amount, "USD", now))
    store.add_billable_usage(
        [
            BillableRecord(first, "acme", "requests", "fp32", 4000),
            BillableRecord(f"{month}-02", "acme", "requests", "int8", 4000),
            BillableRecord(f"{month}-02", "acme", "output_tokens", "int8", 777),  # no price
            BillableRecord(first, "other", "requests", "fp32", 1),
        ]
    )
    store.engine.dispose()
    stack.registry.storage["acme"] = [(first, 10**10), (f"{month}-02", 10**10)]
    stack.inference.replica_usage["acme"] = [
        inference_pb2.ReplicaUsageRow(day=first, deployment="digits", tier="fp32", replica_seconds=3600),
        inference_pb2.ReplicaUsageRow(day=first, deployment="digits-int8", tier="int8", replica_seconds=7200),
    ]
    return month


async def maas(stack: Stack, who: str, *args: str) -> Result:
    """The CLI as a user runs it, in a thread so that the gateway keeps serving meanwhile."""
    env = {"MAAS_API_KEY": stack.keys[who], "MAAS_GATEWAY_ADDR": f"127.0.0.1:{stack.port}", "COLUMNS": "80"}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_the_invoice_json_of_a_month_priced_by_tier(stack: Stack) -> None:
    month = book_month(stack)
    days = Month.parse(month).days
    result = await maas(stack, "admin", "billing", "invoice", "acme", "--month", month, "--json")
    assert result.exit_code == 0, result.output
    invoice = json.loads(result.stdout)
    assert list(invoice) == INVOICE_KEYS and all(list(line) == LINE_KEYS for line in invoice["lines"])
    first, second = f"{month}-01", f"{month}-02"
    storage = f"{20 * 0.30 / days:.2f}"  # 20 GB-days of a month of `days` days at 0.30 per GB-month
    assert invoice["lines"] == [
        {
            "resource": "requests",
            "tier": "fp32",
            "quantity": 4000,
            "unit_price": "2.00",
            "amount": "8.00",
            "unit": "1000 requests",
            "first_day": first,
            "last_day": first,
        },
        {
            "resource": "requests",
            "tier": "int8",
            "quantity": 4000,
            "unit_price": "0.50",
            "amount": "2.00",
            "unit": "1000 requests",
            "first_day": second,
            "last_day": second,
        },
        {
            "resource": "storage_byte_days",
            "tier": "",
            "quantity": 2 * 10**10,
            "unit_price": "0.30",
            "amount": storage,
            "unit": "GB-month",
            "first_day": first,
            "last_day": second,
        },
        {
            "resource": "replica_seconds",
            "tier": "fp32",
            "quantity": 3600,
            "unit_price": "0.90",
            "amount": "0.90",
            "unit": "replica-hour",
            "first_day": first,
            "last_day": first,
        },
        {
            "resource": "replica_seconds",
            "tier": "int8",
            "quantity": 7200,
            "unit_price": "0.90",
            "amount": "1.80",
            "unit": "replica-hour",
            "first_day": first,
            "last_day": first,
        },
    ]
    total = f"{8 + 2 + float(storage) + 0.9 + 1.8:.2f}"
    assert {
        key: invoice[key] for key in ("tenant", "month", "currency", "subtotal", "allowances", "total")
    } == {
        "tenant": "acme",
        "month": month,
        "currency": "USD",
        "subtotal": total,
        "allowances": "0.00",
        "total": total,
    }
    assert invoice["unpriced"] == [{"resource": "output_tokens", "tier": "int8", "quantity": 777}]
    assert (invoice["number"], invoice["finalized"], invoice["finalize_time"], invoice["balance"]) == (
        "",
        False,
        None,
        total,
    )
    # The same input, the same invoice.
    again = await maas(stack, "admin", "billing", "invoice", "acme", "--month", month, "--json")
    assert again.stdout == result.stdout

    final = await maas(
        stack, "admin-of-admin", "billing", "invoice", "acme", "--month", month, "--finalize", "--json"
    )
    assert final.exit_code == 0, final.output
    stored = json.loads(final.stdout)
    assert stored["number"] == f"INV-{month}-0001" and stored["finalized"] and stored["finalize_time"]
    assert stored["lines"] == invoice["lines"] and stored["total"] == total
    credit = await maas(
        stack,
        "admin-of-admin",
        "billing",
        "credit",
        "acme",
        "--invoice",
        stored["number"],
        "--amount",
        "1.5",
        "--reason",
        "replica outage",
    )
    assert credit.exit_code == 0, credit.output
    assert f"against {stored['number']}" in credit.stdout
    read = json.loads(
        (await maas(stack, "admin", "billing", "invoice", "acme", "--month", month, "--json")).stdout
    )
    assert [(n["amount"], n["reason"]) for n in read["credit_notes"]] == [("1.50", "replica outage")]
    assert read["balance"] == f"{float(total) - 1.5:.2f}" and read["total"] == total

    table = await maas(stack, "admin", "billing", "invoice", "acme", "--month", month)
    assert table.exit_code == 0, table.output
    assert (
        f"INV-{month}-0001" in table.stdout and "not billed, no price: output_tokens/int8 777" in table.stdout
    )
    assert max(len(line) for line in table.stdout.splitlines()) <= 80


async def test_prices_plans_spend_and_budgets_from_the_command_line(stack: Stack) -> None:
    root = "admin-of-admin"
    today = datetime.now(UTC).date().isoformat()
    for args in (
        ("price", "set", "requests", "0.40", "--tier", "fp32"),
        ("price", "set", "requests", "0.10", "--tier", "int8"),
        ("price", "set", "output_tokens", "0.60"),
        ("price", "set", "requests", "0.35", "--tier", "fp32", "--effective", "2999-01-01"),
        ("plan", "define", "free", "--include", "requests=10000", "--include", "output_tokens/int8=5000"),
        ("plan", "set", "acme", "free"),
        ("budget", "set", "acme", "250"),
    ):
        result = await maas(stack, root, "billing", *args)
        assert result.exit_code == 0, (args, result.output)
    listed = await maas(stack, "reader", "billing", "price", "list", "--json")
    prices = json.loads(listed.stdout)
    assert [(p["resource"], p["tier"], p["amount"], p["effectiveDay"], p["scheduled"]) for p in prices] == [
        ("output_tokens", "", "0.60", today, False),
        ("requests", "fp32", "0.40", today, False),
        ("requests", "fp32", "0.35", "2999-01-01", True),
        ("requests", "int8", "0.10", today, False),
    ]
    table = await maas(stack, "reader", "billing", "price", "list")
    assert "scheduled" in table.stdout and "1000 requests" in table.stdout
    plans = await maas(stack, "reader", "billing", "plan", "list")
    assert "output_tokens/int8=5,000, requests=10,000" in plans.stdout
    spend = await maas(stack, "admin", "billing", "spend", "acme")
    assert spend.exit_code == 0, spend.output
    assert "0.00 USD so far" in spend.stdout and "budget 250.00 USD: 0% used" in spend.stdout
    spent = json.loads((await maas(stack, "admin", "billing", "spend", "acme", "--json")).stdout)
    assert spent["budget"] == "250.00" and spent["monthToDate"] == "0.00" and spent["daysInMonth"] >= 28
    invoice = json.loads((await maas(stack, "admin", "billing", "invoice", "acme", "--json")).stdout)
    assert invoice["plan"] == "free" and invoice["month"] == today[:7]
    removed = await maas(stack, root, "billing", "budget", "set", "acme", "0")
    assert "removed" in removed.stdout


@pytest.mark.parametrize(
    ("who", "args", "says"),
    [
        ("admin", ("price", "set", "requests", "0.40"), "PERMISSION_DENIED"),
        ("admin-of-admin", ("price", "set", "requests", "1e3"), "INVALID_ARGUMENT"),
        ("admin-of-admin", ("price", "set", "requests", "1", "--tier", "fp8"), "unknown tier 'fp8'"),
        ("admin-of-admin", ("price", "set", "gpu_hours", "1"), "unknown resource 'gpu_hours'"),
        ("admin-of-admin", ("plan", "define", "free", "--include", "requests"), "RESOURCE[/TIER]=QUANTITY"),
        ("admin-of-admin", ("plan", "set", "acme", "gold"), "NOT_FOUND"),
        ("admin-of-admin", ("invoice", "acme", "--month", "2999-01"), "has not begun"),
        ("admin-of-admin", ("invoice", "nobody", "--month", "2026-01"), "tenant 'nobody' not found"),
        ("admin-of-admin", ("invoice", "acme", "--finalize"), "FAILED_PRECONDITION"),
        ("admin", ("invoice", "other"), "PERMISSION_DENIED"),
        (
            "admin-of-admin",
            ("credit", "acme", "--invoice", "INV-X", "--amount", "1", "--reason", "x"),
            "NOT_FOUND",
        ),
        ("admin-of-admin", ("budget", "set", "acme", "12.345"), "at most 2 decimal places"),
    ],
)
async def test_the_cli_says_what_was_wrong(stack: Stack, who: str, args: tuple[str, ...], says: str) -> None:
    result = await maas(stack, who, "billing", *args)
    assert result.exit_code != 0
    assert says in result.output


async def test_calls_through_the_gateway_are_invoiced_at_the_price_of_the_tier_that_answered(
    stack: Stack,
) -> None:
    await stack.wait_for_routes()
    address = stack.triton_address
    stack.routing.publish(
        [tiered(route("acme", "mlp", address), "fp32"), tiered(route("acme", "small", address), "int8")]
    )
    await wait_for_route(stack, "small")
    values = np.arange(4, dtype=np.float32).reshape(1, 4)
    for deployment, calls in (("mlp", 3), ("small", 5)):
        for _ in range(calls):
            await stack.inference_stub.Predict(
                predict_request(deployment, values), metadata=stack.auth("reader")
            )
    root = stack.auth("admin-of-admin")
    for tier, amount in (("fp32", "1000"), ("int8", "250")):  # 1.00 and 0.25 a request
        await stack.billing.SetPrice(
            billing_pb2.SetPriceRequest(resource="requests", tier=tier, amount=amount), metadata=root
        )
    month = datetime.now(UTC).strftime("%Y-%m")
    request = billing_pb2.GetInvoiceRequest(tenant="acme", month=month)
    invoice = (await stack.billing.GetInvoice(request, metadata=stack.auth("admin"))).invoice
    assert [(line.tier, line.quantity, line.unit_price, line.amount) for line in invoice.lines] == [
        ("fp32", 3, "1000", "3.00"),
        ("int8", 5, "250", "1.25"),
    ]
    assert (invoice.subtotal, invoice.total, invoice.finalized) == ("4.25", "4.25", False)
    again = (await stack.billing.GetInvoice(request, metadata=root)).invoice
    assert again == invoice
