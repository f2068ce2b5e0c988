"""Who may call which BillingService method on which tenant, through the real gateway
(interceptors included): any key lists prices and plans, a tenant's admin reads its own
invoices and spend, every change needs a platform admin; refused changes are audited."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf.message import Message
from maas.gateway.v1 import admin_pb2, billing_pb2

from services.common.database import make_engine
from services.gateway.billing import Month
from services.gateway.store import BillableRecord, GatewayStore, PriceRecord
from tests.unit.gateway.gateway_fakes import Stack, gateway_stack

OK, DENIED, NOT_FOUND = "OK", "PERMISSION_DENIED", "NOT_FOUND"
NOT_ASKED = "."
CALLERS = {
    "platform": "admin-of-admin",
    "acme-admin": "admin",
    "acme-dev": "developer",
    "acme-reader": "reader",
}
TARGETS = {"-": "", "own": "acme", "other": "other", "missing": "nobody"}

_ = NOT_ASKED
ANYONE = {caller: (OK, _, _, _) for caller in CALLERS}
PLATFORM_ONLY = {"platform": (OK, _, _, _), **{caller: (DENIED, _, _, _) for caller in list(CALLERS)[1:]}}
# Changes to a tenant's books: a platform admin's alone.
PLATFORM_PER_TENANT = {
    "platform": (_, OK, OK, NOT_FOUND),
    **{c: (_, DENIED, DENIED, DENIED) for c in list(CALLERS)[1:]},
}
# Reading a tenant's books: its own admin too.
OWN_ADMIN_READS = {
    "platform": (_, OK, OK, NOT_FOUND),
    "acme-admin": (_, OK, DENIED, DENIED),
    "acme-dev": (_, DENIED, DENIED, DENIED),
    "acme-reader": (_, DENIED, DENIED, DENIED),
}
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "SetPrice": PLATFORM_ONLY,
    "ListPrices": ANYONE,  # customers pick a tier knowing its price
    "DefinePlan": PLATFORM_ONLY,
    "ListPlans": ANYONE,
    "SetTenantPlan": PLATFORM_PER_TENANT,
    "GetInvoice": OWN_ADMIN_READS,
    "FinalizeInvoice": PLATFORM_PER_TENANT,
    "CreateCreditNote": PLATFORM_PER_TENANT,
    "GetSpend": OWN_ADMIN_READS,
    "SetBudget": PLATFORM_PER_TENANT,
}


def billed_month() -> str:
    """Two months ago: over, and past the finalize grace, whenever the test runs."""
    today = datetime.now(UTC).date()
    return str(Month(today.year - (today.month <= 2), (today.month - 3) % 12 + 1))


def book_usage(stack: Stack) -> None:
    """10.00 of requests for acme and for other in the billed month."""
    store = GatewayStore(make_engine(stack.settings.gateway_database_url))
    first = f"{billed_month()}-01"
    store.set_price(PriceRecord("requests", "", first, "1.00", "USD", datetime.now(UTC)))
    store.add_billable_usage(
        [BillableRecord(first, tenant, "requests", "fp32", 10_000) for tenant in ("acme", "other")]
    )
    store.engine.dispose()


async def _plan(stack: Stack, tenant: str) -> Message:
    plan = billing_pb2.Plan(
        name="free", allowances=[billing_pb2.Allowance(resource="requests", quantity=100)]
    )
    await stack.billing.DefinePlan(
        billing_pb2.DefinePlanRequest(plan=plan), metadata=stack.auth("admin-of-admin")
    )
    return billing_pb2.SetTenantPlanRequest(tenant=tenant, plan="free")


async def _credit(stack: Stack, tenant: str) -> Message:
    number = ""
    if tenant != "nobody":
        invoice = await stack.billing.FinalizeInvoice(
            billing_pb2.FinalizeInvoiceRequest(tenant=tenant, month=billed_month()),
            metadata=stack.auth("admin-of-admin"),
        )
        number = invoice.invoice.number
    return billing_pb2.CreateCreditNoteRequest(
        tenant=tenant, invoice_number=number or "INV-1", amount="0.01", reason="test"
    )


async def _plain(message: Message) -> Message:
    return message


REQUESTS: dict[str, Callable[[Stack, str], Awaitable[Message]]] = {
    "SetPrice": lambda s, t: _plain(
        billing_pb2.SetPriceRequest(resource="requests", tier="int8", amount="0.50")
    ),
    "ListPrices": lambda s, t: _plain(billing_pb2.ListPricesRequest()),
    "DefinePlan": lambda s, t: _plain(
        billing_pb2.DefinePlanRequest(
            plan=billing_pb2.Plan(
                name="pro",
                allowances=[billing_pb2.Allowance(resource="output_tokens", tier="int8", quantity=5)],
            )
        )
    ),
    "ListPlans": lambda s, t: _plain(billing_pb2.ListPlansRequest()),
    "SetTenantPlan": _plan,
    "GetInvoice": lambda s, t: _plain(billing_pb2.GetInvoiceRequest(tenant=t, month=billed_month())),
    "FinalizeInvoice": lambda s, t: _plain(
        billing_pb2.FinalizeInvoiceRequest(tenant=t, month=billed_month())
    ),
    "CreateCreditNote": _credit,
    "GetSpend": lambda s, t: _plain(billing_pb2.GetSpendRequest(tenant=t)),
    "SetBudget": lambda s, t: _plain(billing_pb2.SetBudgetRequest(tenant=t, amount="100")),
}


@pytest.fixture
async def stack(tmp_path):
    async with gateway_stack(tmp_path) as stack:
        book_usage(stack)
        yield stack


def test_every_billing_method_has_a_row_for_every_caller() -> None:
    """A new BillingService method must say here who may call it."""
    methods = [m.name for m in billing_pb2.DESCRIPTOR.services_by_name["BillingService"].methods]
    assert sorted(EXPECTED) == sorted(methods) == sorted(REQUESTS)
    for method, rows in EXPECTED.items():
        assert sorted(rows) == sorted(CALLERS), method
        assert all(len(cells) == len(TARGETS) for cells in rows.values()), method


async def _outcome(stack: Stack, method: str, caller: str, tenant: str) -> str:
    request = await REQUESTS[method](stack, tenant)
    try:
        await getattr(stack.billing, method)(request, metadata=stack.auth(CALLERS[caller]))
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return OK


async def test_permission_matrix(stack: Stack) -> None:
    expected, actual = {}, {}
    for method, caller in itertools.product(EXPECTED, CALLERS):
        for column, cell in zip(TARGETS, EXPECTED[method][caller], strict=True):
            expected[method, caller, column] = cell
            actual[method, caller, column] = (
                NOT_ASKED if cell == NOT_ASKED else await _outcome(stack, method, caller, TARGETS[column])
            )
    wrong = sorted(cell for cell in expected if expected[cell] != actual[cell])
    assert not wrong, f"{len(wrong)} cells out of place: {[(cell, actual[cell]) for cell in wrong]}"


async def test_a_tenant_admin_cannot_set_prices_nor_read_another_tenants_invoice(stack: Stack) -> None:
    acme = stack.auth("admin")
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stack.billing.SetPrice(
            billing_pb2.SetPriceRequest(resource="requests", amount="0"), metadata=acme
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "setting a price needs a platform admin key" in denied.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stack.billing.GetInvoice(
            billing_pb2.GetInvoiceRequest(tenant="other", month=billed_month()), metadata=acme
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'other'" in denied.value.details() and stack.key_ids["admin"] in denied.value.details()
    own = await stack.billing.GetInvoice(
        billing_pb2.GetInvoiceRequest(tenant="acme", month=billed_month()), metadata=acme
    )
    assert own.invoice.total == "10.00"
    # A developer's key is refused by its role before anything is looked at.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stack.billing.GetSpend(
            billing_pb2.GetSpendRequest(tenant="acme"), metadata=stack.auth("developer")
        )
    assert "needs the admin role" in denied.value.details()


async def test_changes_and_refusals_are_audited(stack: Stack) -> None:
    root = stack.auth("admin-of-admin")
    await stack.billing.SetPrice(
        billing_pb2.SetPriceRequest(resource="requests", tier="int8", amount="0.50"), metadata=root
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.billing.SetPrice(billing_pb2.SetPriceRequest(resource="gpus", amount="1"), metadata=root)
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.billing.FinalizeInvoice(
            billing_pb2.FinalizeInvoiceRequest(tenant="acme", month=billed_month()),
            metadata=stack.auth("reader"),
        )
    finalized = await stack.billing.FinalizeInvoice(
        billing_pb2.FinalizeInvoiceRequest(tenant="acme", month=billed_month()), metadata=root
    )
    events = await stack.admin.ListAuditEvents(admin_pb2.ListAuditEventsRequest(), metadata=root)
    seen = [(e.method.rpartition("/")[2], e.resource, e.code, e.tenant) for e in events.audit_events]
    today = datetime.now(UTC).date().isoformat()
    assert ("SetPrice", f"requests/int8@{today}", "OK", "admin") in seen
    assert ("SetPrice", "gpus@today", "INVALID_ARGUMENT", "admin") in seen
    assert ("FinalizeInvoice", "", "PERMISSION_DENIED", "acme") in seen
    assert ("FinalizeInvoice", finalized.invoice.number, "OK", "admin") in seen
    assert not any(method in ("GetInvoice", "ListPrices") for method, *_ in seen)  # reads are not


async def test_billing_calls_are_never_limited_nor_counted_as_requests(stack: Stack) -> None:
    root, acme = stack.auth("admin-of-admin"), stack.auth("admin")
    await stack.admin.SetQuota(
        admin_pb2.SetQuotaRequest(quota=admin_pb2.Quota(tenant="acme", requests_per_day=1)), metadata=root
    )
    for _ in range(3):  # a tenant over its quota still reads what it owes
        await stack.billing.GetSpend(billing_pb2.GetSpendRequest(tenant="acme"), metadata=acme)
        await stack.billing.GetInvoice(billing_pb2.GetInvoiceRequest(tenant="acme", month=billed_month()), metadata=acme)
        await stack.billing.ListPrices(billing_pb2.ListPricesRequest(), metadata=stack.auth("reader"))
    usage = await stack.admin.GetUsage(admin_pb2.GetUsageRequest(tenant="acme"), metadata=root)
    assert sum(row.requests for row in usage.rows) == 0
