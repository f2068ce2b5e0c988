"""Invoice arithmetic and the billing domain over a real SQLite store: exact amounts for known
usage (tiers priced differently, a price change in the middle of the month, storage per
GB-month, replica-hours), allowances, rounding, determinism, a finalized month that never
changes, credit notes, gap-free numbering under concurrent finalization, spend, budgets, and
every bad input refused with the right code. Storage and replica usage come from fakes."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common.database import make_engine, upgrade
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from services.common.leader import LeaderLock
from services.gateway.auth import Caller
from services.gateway.billing import Month, price_invoice
from services.gateway.billing_service import Billing, BudgetWatch
from services.gateway.billing_sources import MeteredUsage
from services.gateway.keys import Role
from services.gateway.server import MIGRATIONS
from services.gateway.store import AllowanceRecord, BillableRecord, GatewayStore, PriceRecord, TenantRecord

MARCH = "2026-03"
PLATFORM = Caller("admin", Role.ADMIN, "rootkey00000")
ACME_ADMIN = Caller("acme", Role.ADMIN, "acmeadmin000")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class FakeSource:
    """Rows of one tenant's usage (storage or replicas), or an outage."""

    def __init__(self) -> None:
        self.rows: list[BillableRecord] = []
        self.down = False

    async def daily_usage(self, tenant: str, first_day: str, last_day: str) -> list[BillableRecord]:
        if self.down:
            raise Unavailable("the registry did not answer the storage usage of tenant 'acme'")
        return [r for r in self.rows if r.tenant == tenant and first_day <= r.day <= last_day]


def at(day: str, hour: int = 12) -> datetime:
    return datetime.fromisoformat(day).replace(hour=hour, tzinfo=UTC)


def open_store(path: Path) -> GatewayStore:
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine, MIGRATIONS)
    return GatewayStore(engine)


class Books:
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "gateway.db"
        self.store = open_store(self.path)
        for tenant in ("admin", "acme", "other"):
            self.store.create_tenant(TenantRecord(tenant, "", at("2026-01-01")))
        self.clock = Clock(at("2026-02-20"))
        self.storage, self.replicas = FakeSource(), FakeSource()
        self.billing = Billing(
            self.store, [MeteredUsage(self.store), self.storage, self.replicas], "USD", 3600, clock=self.clock
        )

    def use(self, day: str, resource: str, tier: str, quantity: int, tenant: str = "acme") -> None:
        self.store.add_billable_usage([BillableRecord(day, tenant, resource, tier, quantity)])

    async def price(self, resource: str, amount: str, tier: str = "", day: str = "2026-03-01") -> None:
        await self.billing.set_price(resource, tier, amount, day, caller=PLATFORM)


@pytest.fixture
def books(tmp_path: Path) -> Books:
    return Books(tmp_path)


async def march_book(books: Books) -> None:
    """Prices set in February for March, one of them changing on the 16th, and March's usage."""
    await books.price("requests", "2.00", "fp32")
    await books.price("requests", "3.00", "fp32", day="2026-03-16")
    await books.price("requests", "0.50", "int8")
    await books.price("output_tokens", "0.25")  # every tier
    await books.price("training_cpu_seconds", "0.0001")
    await books.price("storage_byte_days", "0.10")
    await books.price("replica_seconds", "1.20", "fp32")
    for day, quantity in (
        ("2026-03-01", 1000),
        ("2026-03-15", 500),
        ("2026-03-16", 2000),
        ("2026-03-31", 250),
    ):
        books.use(day, "requests", "fp32", quantity)
    books.use("2026-03-10", "requests", "int8", 3000)
    books.use("2026-03-02", "output_tokens", "int8", 10_000)
    books.use("2026-03-02", "input_tokens", "fp32", 500)  # no price: not billed, but named
    books.use("2026-03-05", "training_cpu_seconds", "", 12_345)
    books.use("2026-03-05", "requests", "fp32", 999, tenant="other")
    books.use("2026-04-01", "requests", "fp32", 999)  # April: not March's
    books.storage.rows = [
        BillableRecord(f"2026-03-{d:02d}", "acme", "storage_byte_days", "", 2 * 10**9) for d in range(1, 32)
    ]
    books.replicas.rows = [
        BillableRecord("2026-03-03", "acme", "replica_seconds", "fp32", 7200),
        BillableRecord("2026-03-04", "acme", "replica_seconds", "fp32", 1800),
        BillableRecord("2026-03-04", "acme", "replica_seconds", "int8", 3600),  # no int8 price
    ]
    books.clock.now = at("2026-04-10")


def lines_of(invoice) -> list[tuple]:  # type: ignore[no-untyped-def]
    return [
        (
            line.resource,
            line.tier,
            line.quantity,
            str(line.unit_price),
            str(line.amount),
            line.first_day,
            line.last_day,
        )
        for line in invoice.lines
    ]


async def test_a_month_of_known_usage_gives_the_exact_invoice(books: Books) -> None:
    await march_book(books)
    invoice = await books.billing.invoice("acme", MARCH, caller=PLATFORM)
    assert lines_of(invoice) == [
        # The price change on the 16th splits fp32 requests in two lines, each at the price of its days.
        ("requests", "fp32", 1500, "2.00", "3.00", "2026-03-01", "2026-03-15"),
        ("requests", "fp32", 2250, "3.00", "6.75", "2026-03-16", "2026-03-31"),
        ("requests", "int8", 3000, "0.50", "1.50", "2026-03-10", "2026-03-10"),  # int8 is the cheaper tier
        ("output_tokens", "int8", 10_000, "0.25", "2.50", "2026-03-02", "2026-03-02"),  # the tier-less price
        ("training_cpu_seconds", "", 12_345, "0.0001", "1.23", "2026-03-05", "2026-03-05"),  # 1.2345
        ("storage_byte_days", "", 62 * 10**9, "0.10", "0.20", "2026-03-01", "2026-03-31"),  # 2 GB all month
        ("replica_seconds", "fp32", 9000, "1.20", "3.00", "2026-03-03", "2026-03-04"),  # 2.5 hours
    ]
    assert invoice.lines[0].unit == "1000 requests" and invoice.lines[-1].unit == "replica-hour"
    assert (invoice.subtotal, invoice.allowances, invoice.total) == (
        Decimal("18.18"),
        Decimal("0.00"),
        Decimal("18.18"),
    )
    assert str(invoice.total) == "18.18" and invoice.currency == "USD" and invoice.number == ""
    assert [(u.resource, u.tier, u.quantity) for u in invoice.unpriced] == [
        ("input_tokens", "fp32", 500),
        ("replica_seconds", "int8", 3600),
    ]


async def test_allowances_cover_the_months_earliest_usage_tier_first(books: Books) -> None:
    await march_book(books)
    books.clock.now = at("2026-02-25")
    await books.billing.define_plan(
        "starter",
        [
            AllowanceRecord("requests", "int8", 1000),
            AllowanceRecord("requests", "", 2000),  # any tier, after a tier's own
            AllowanceRecord("output_tokens", "", 4000),
            AllowanceRecord("embedding_tokens", "", 5),  # unused: worth nothing
        ],
        caller=PLATFORM,
    )
    await books.billing.set_tenant_plan("acme", "starter", MARCH, caller=PLATFORM)
    books.clock.now = at("2026-04-10")
    invoice = await books.billing.invoice("acme", MARCH, caller=PLATFORM)
    assert invoice.plan == "starter"
    # fp32 on the 1st takes 1000 of the any-tier 2000; int8 on the 10th its own 1000, then the other 1000.
    assert [
        (line.resource, line.tier, line.quantity, str(line.amount), line.first_day, line.last_day)
        for line in invoice.included
    ] == [
        ("requests", "fp32", 1000, "2.00", "2026-03-01", "2026-03-01"),
        ("requests", "int8", 2000, "1.00", "2026-03-10", "2026-03-10"),
        ("output_tokens", "int8", 4000, "1.00", "2026-03-02", "2026-03-02"),
    ]
    assert lines_of(invoice)[0][2] == 1500  # lines keep the whole quantity
    assert (str(invoice.subtotal), str(invoice.allowances), str(invoice.total)) == ("18.18", "4.00", "14.18")
    # Other tenants and months are not on the plan.
    assert (await books.billing.invoice("other", MARCH, caller=PLATFORM)).plan == ""
    assert (await books.billing.invoice("acme", "2026-02", caller=PLATFORM)).lines == ()


async def test_amounts_round_half_even_to_the_cent_per_line(books: Books) -> None:
    await books.price("requests", "0.25", "fp16")
    await books.price("requests", "0.25", "distilled")
    await books.price("requests", "0.25", "int8")
    books.use("2026-03-01", "requests", "fp16", 500)  # 0.125 -> 0.12
    books.use("2026-03-01", "requests", "distilled", 540)  # 0.135 -> 0.14
    books.use("2026-03-01", "requests", "int8", 1)  # 0.00025 -> 0.00
    books.clock.now = at("2026-04-01")
    invoice = await books.billing.invoice("acme", MARCH, caller=PLATFORM)
    assert [(line.tier, str(line.amount)) for line in invoice.lines] == [
        ("distilled", "0.14"),
        ("fp16", "0.12"),
        ("int8", "0.00"),
    ]
    assert str(invoice.total) == "0.26"


async def test_the_same_usage_in_any_order_gives_the_same_invoice(books: Books) -> None:
    await march_book(books)
    first = await books.billing.invoice("acme", MARCH, caller=PLATFORM)
    usage = (
        books.store.billable_usage("acme", "2026-03-01", "2026-03-31")
        + books.storage.rows
        + books.replicas.rows
    )
    halves = [
        BillableRecord(r.day, r.tenant, r.resource, r.tier, q)
        for r in usage
        for q in (r.quantity // 2, r.quantity - r.quantity // 2)
    ]
    random.Random(7).shuffle(halves)
    prices = books.store.list_prices()
    random.Random(8).shuffle(prices)
    again = price_invoice("acme", Month(2026, 3), "USD", halves, prices)
    assert again.document() == first.document()


async def test_a_finalized_month_never_changes(books: Books) -> None:
    await march_book(books)
    draft = await books.billing.invoice("acme", MARCH, caller=PLATFORM)
    final = await books.billing.finalize("acme", MARCH, caller=PLATFORM)
    assert final.number == "INV-2026-03-0001" and final.finalize_time is not None
    assert final.document() == draft.document()
    # Late usage, a price rewritten behind the book's back, a plan: the stored invoice stands.
    books.use("2026-03-20", "requests", "fp32", 10**6)
    books.storage.rows.append(BillableRecord("2026-03-31", "acme", "storage_byte_days", "", 10**15))
    books.store.set_price(PriceRecord("requests", "int8", "2026-03-01", "99", "USD", at("2026-04-10")))
    read = await books.billing.invoice("acme", MARCH, caller=ACME_ADMIN)
    assert read.document() == final.document() and read.number == final.number
    assert (await books.billing.finalize("acme", MARCH, caller=PLATFORM)).number == final.number
    # Recomputed it would differ: it is the storage that keeps it.
    usage = (
        books.store.billable_usage("acme", "2026-03-01", "2026-03-31")
        + books.storage.rows
        + books.replicas.rows
    )
    recomputed = price_invoice("acme", Month(2026, 3), "USD", usage, books.store.list_prices())
    assert recomputed.total != final.total


async def test_finalize_waits_until_the_month_is_over_and_its_usage_landed(books: Books) -> None:
    await march_book(books)
    for now in (at("2026-03-31", 23), datetime(2026, 4, 1, 0, 59, tzinfo=UTC)):
        books.clock.now = now
        with pytest.raises(FailedPrecondition, match="from 2026-04-01 01:00 UTC on"):
            await books.billing.finalize("acme", MARCH, caller=PLATFORM)
    assert books.store.get_invoice("acme", MARCH) is None
    books.clock.now = datetime(2026, 4, 1, 1, 0, tzinfo=UTC)
    assert (await books.billing.finalize("acme", MARCH, caller=PLATFORM)).number == "INV-2026-03-0001"


async def test_numbers_have_no_gaps_under_concurrent_finalization(books: Books) -> None:
    tenants = [f"t{index:02d}" for index in range(12)]
    for tenant in tenants:
        books.store.create_tenant(TenantRecord(tenant, "", at("2026-01-01")))
    # Two "gateway processes" (their own engines on one database) per tenant, all at once.
    stores = [open_store(books.path) for _ in range(4)]
    start = threading.Barrier(len(tenants) * 2)
    numbers: dict[str, set[str]] = {tenant: set() for tenant in tenants}

    def finalize(store: GatewayStore, tenant: str) -> None:
        start.wait()
        stored = store.finalize_invoice(tenant, MARCH, "USD", 100, "{}", at("2026-04-10"))
        numbers[tenant].add(stored.number)

    threads = [
        threading.Thread(target=finalize, args=(stores[(index + twice) % len(stores)], tenant))
        for index, tenant in enumerate(tenants)
        for twice in (0, 1)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(found) == 1 for found in numbers.values()), numbers  # one invoice per tenant
    given = sorted(number for found in numbers.values() for number in found)
    assert given == [f"INV-2026-03-{n:04d}" for n in range(1, len(tenants) + 1)]
    # In one process too: concurrent finalizations of one tenant store one invoice.
    books.clock.now = at("2026-05-02")
    results = await asyncio.gather(
        *(books.billing.finalize("acme", "2026-04", caller=PLATFORM) for _ in range(5))
    )
    assert {invoice.number for invoice in results} == {"INV-2026-04-0001"}


async def test_credit_notes_correct_a_finalized_invoice_up_to_its_total(books: Books) -> None:
    await march_book(books)
    final = await books.billing.finalize("acme", MARCH, caller=PLATFORM)
    note = await books.billing.credit("acme", final.number, "5", "outage on 2026-03-12", caller=PLATFORM)
    assert (note.number, note.amount, note.invoice_number) == ("CN-2026-04-0001", "5.00", final.number)
    second = await books.billing.credit("acme", final.number, "13.18", "goodwill", caller=PLATFORM)
    assert second.number == "CN-2026-04-0002"
    with pytest.raises(
        FailedPrecondition, match="more than what is left of invoice INV-2026-03-0001 \\(0.00 USD"
    ):
        await books.billing.credit("acme", final.number, "0.01", "too much", caller=PLATFORM)
    read = await books.billing.invoice("acme", MARCH, caller=ACME_ADMIN)
    assert [n.number for n in read.credit_notes] == ["CN-2026-04-0001", "CN-2026-04-0002"]
    assert str(read.total) == "18.18" and str(read.balance) == "0.00"  # the invoice itself never changes
    for amount in ("0", "-1", "1.234", "1e3", "", "abc", "1,00"):
        with pytest.raises(InvalidArgument):
            await books.billing.credit("acme", final.number, amount, "why", caller=PLATFORM)
    with pytest.raises(InvalidArgument, match="reason is required"):
        await books.billing.credit("acme", final.number, "1", "  ", caller=PLATFORM)
    with pytest.raises(NotFound):
        await books.billing.credit("other", final.number, "1", "another tenant's invoice", caller=PLATFORM)
    with pytest.raises(NotFound, match="only finalized invoices have numbers"):
        await books.billing.credit("acme", "INV-2026-02-0001", "1", "why", caller=PLATFORM)
    with pytest.raises(PermissionDenied):
        await books.billing.credit("acme", final.number, "1", "my own", caller=ACME_ADMIN)


async def test_concurrent_credit_notes_never_pass_the_total(books: Books) -> None:
    await march_book(books)
    final = await books.billing.finalize("acme", MARCH, caller=PLATFORM)
    outcomes = await asyncio.gather(
        *(
            books.billing.credit("acme", final.number, "5.00", f"credit {n}", caller=PLATFORM)
            for n in range(6)
        ),
        return_exceptions=True,
    )
    issued = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(issued) == 3 and all(
        isinstance(o, FailedPrecondition) for o in outcomes if isinstance(o, Exception)
    )
    assert sorted(n.number for n in issued) == ["CN-2026-04-0001", "CN-2026-04-0002", "CN-2026-04-0003"]
    assert str((await books.billing.invoice("acme", MARCH)).balance) == "3.18"


async def test_spend_forecast_and_the_budget_gauge(books: Books) -> None:
    await books.price("requests", "1.00", "fp32")
    for day in range(1, 11):
        books.use(f"2026-03-{day:02d}", "requests", "fp32", 1000)
    books.clock.now = at("2026-03-10")
    spend = await books.billing.spend("acme", caller=ACME_ADMIN)
    assert (str(spend.month_to_date), str(spend.forecast), spend.days_elapsed, spend.days_in_month) == (
        "10.00",
        "31.00",
        10,
        31,
    )
    assert spend.budget is None and spend.budget_used_ratio == 0
    budget = await books.billing.set_budget("acme", "12.5", caller=PLATFORM)
    assert budget is not None and budget.amount == "12.50"
    assert (await books.billing.spend("acme")).budget_used_ratio == pytest.approx(0.8)
    await books.billing.refresh_budgets()
    assert REGISTRY.get_sample_value("maas_billing_budget_used_ratio", {"tenant": "acme"}) == pytest.approx(
        0.8
    )
    books.use("2026-03-10", "requests", "fp32", 3000)
    await books.billing.refresh_budgets()
    assert REGISTRY.get_sample_value("maas_billing_budget_used_ratio", {"tenant": "acme"}) == pytest.approx(
        1.04
    )
    assert await books.billing.set_budget("acme", "0", caller=PLATFORM) is None
    assert (await books.billing.spend("acme")).budget is None
    await books.billing.refresh_budgets()
    assert REGISTRY.get_sample_value("maas_billing_budget_used_ratio", {"tenant": "acme"}) == 0
    with pytest.raises(PermissionDenied):
        await books.billing.set_budget("acme", "1000", caller=ACME_ADMIN)
    with pytest.raises(PermissionDenied, match="needs a platform admin key or an admin key of that tenant"):
        await books.billing.spend("other", caller=ACME_ADMIN)
    for amount in ("-5", "1.001", "x", ""):
        with pytest.raises(InvalidArgument):
            await books.billing.set_budget("acme", amount, caller=PLATFORM)


async def test_an_invoice_is_never_computed_from_part_of_the_usage(books: Books) -> None:
    await march_book(books)
    books.storage.down = True
    with pytest.raises(Unavailable):
        await books.billing.invoice("acme", MARCH)
    with pytest.raises(Unavailable):
        await books.billing.finalize("acme", MARCH, caller=PLATFORM)
    assert books.store.get_invoice("acme", MARCH) is None


async def test_prices_list_in_force_and_scheduled(books: Books) -> None:
    await books.price("requests", "2.00", "fp32", day="2026-02-20")
    await books.price("requests", "3.00", "fp32", day="2026-03-16")
    await books.price("requests", "1.00", day="2026-02-20")
    books.clock.now = at("2026-03-01")
    listed = await books.billing.list_prices()
    assert [(p.price.tier, p.price.amount, p.price.effective_day, p.scheduled) for p in listed] == [
        ("", "1.00", "2026-02-20", False),
        ("fp32", "2.00", "2026-02-20", False),
        ("fp32", "3.00", "2026-03-16", True),
    ]
    books.clock.now = at("2026-03-16")
    assert [p.price.amount for p in await books.billing.list_prices()] == ["1.00", "3.00"]
    assert [p.price.amount for p in await books.billing.list_prices(include_superseded=True)] == [
        "1.00",
        "2.00",
        "3.00",
    ]
    # The same day again replaces that day's price.
    await books.price("requests", "3.50", "fp32", day="2026-03-16")
    assert [p.price.amount for p in await books.billing.list_prices()] == ["1.00", "3.50"]


async def test_plans_are_immutable_and_assigned_from_a_month(books: Books) -> None:
    allowances = [AllowanceRecord("requests", "", 10_000), AllowanceRecord("output_tokens", "", 100_000)]
    plan = await books.billing.define_plan("free", allowances, caller=PLATFORM)
    assert [(a.resource, a.quantity) for a in plan.allowances] == [
        ("output_tokens", 100_000),
        ("requests", 10_000),
    ]
    assert (await books.billing.define_plan("free", list(reversed(allowances)), caller=PLATFORM)) == plan
    with pytest.raises(AlreadyExists, match="define a plan of another name"):
        await books.billing.define_plan("free", allowances[:1], caller=PLATFORM)
    assert (await books.billing.set_tenant_plan("acme", "free", "", caller=PLATFORM)).start_month == "2026-02"
    assert (
        books.store.tenant_plan("acme", "2026-01") == ""
        and books.store.tenant_plan("acme", "2027-01") == "free"
    )
    with pytest.raises(NotFound, match="did you mean 'free'"):
        await books.billing.set_tenant_plan("acme", "fre", "", caller=PLATFORM)
    with pytest.raises(InvalidArgument, match="start month 2026-01 is over"):
        await books.billing.set_tenant_plan("acme", "free", "2026-01", caller=PLATFORM)
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        await books.billing.set_tenant_plan("nobody", "free", "", caller=PLATFORM)
    with pytest.raises(PermissionDenied):
        await books.billing.set_tenant_plan("acme", "free", "", caller=ACME_ADMIN)
    with pytest.raises(PermissionDenied):
        await books.billing.define_plan("mine", [], caller=ACME_ADMIN)


@pytest.mark.parametrize(
    ("allowances", "message"),
    [
        ([AllowanceRecord("gpus", "", 1)], "unknown resource 'gpus'"),
        ([AllowanceRecord("requests", "bf16", 1)], "unknown tier 'bf16'"),
        ([AllowanceRecord("storage_byte_days", "int8", 1)], "has no tiers"),
        ([AllowanceRecord("requests", "", 0)], "between 1 and"),
        ([AllowanceRecord("requests", "", 2**63)], "between 1 and"),
        ([AllowanceRecord("requests", "", 1), AllowanceRecord("requests", "", 2)], "given twice"),
    ],
)
async def test_bad_plans_are_refused(books: Books, allowances: list[AllowanceRecord], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await books.billing.define_plan("bad", allowances, caller=PLATFORM)
    with pytest.raises(InvalidArgument, match="invalid plan name"):
        await books.billing.define_plan("Bad Plan", [], caller=PLATFORM)


@pytest.mark.parametrize(
    ("resource", "tier", "amount", "day", "message"),
    [
        ("gpus", "", "1", "", "unknown resource 'gpus'"),
        ("requests", "fp8", "1", "", "unknown tier 'fp8'"),
        ("training_cpu_seconds", "fp32", "1", "", "has no tiers"),
        ("requests", "", "-1", "", "not an amount"),
        ("requests", "", "1e3", "", "not an amount"),
        ("requests", "", "NaN", "", "not an amount"),
        ("requests", "", "0.1234567890123", "", "not an amount"),
        ("requests", "", "", "", "not an amount"),
        ("requests", "", "1", "2026-02-19", "before today"),
        ("requests", "", "1", "2026-02-30", "not a day"),
        ("requests", "", "1", "tomorrow", "not a day"),
    ],
)
async def test_bad_prices_are_refused(
    books: Books, resource: str, tier: str, amount: str, day: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await books.billing.set_price(resource, tier, amount, day, caller=PLATFORM)
    assert books.store.list_prices() == []


async def test_only_a_platform_admin_sets_prices(books: Books) -> None:
    with pytest.raises(PermissionDenied, match="setting a price needs a platform admin key"):
        await books.billing.set_price("requests", "", "0", "", caller=ACME_ADMIN)
    # A price of zero is a price: the usage is billed at nothing, not listed as unpriced.
    await books.billing.set_price("requests", "", "0", "", caller=PLATFORM)
    assert [p.price.amount for p in await books.billing.list_prices()] == ["0"]


async def test_bad_invoice_requests_are_refused(books: Books) -> None:
    books.clock.now = at("2026-03-10")
    with pytest.raises(InvalidArgument, match="has not begun"):
        await books.billing.invoice("acme", "2026-04", caller=PLATFORM)
    for month in ("2026-13", "2026-3", "03-2026", "", "1969-12"):
        with pytest.raises(InvalidArgument):
            await books.billing.invoice("acme", month, caller=PLATFORM)
    with pytest.raises(NotFound, match="tenant 'nobody' not found"):
        await books.billing.invoice("nobody", "2026-03", caller=PLATFORM)
    with pytest.raises(InvalidArgument, match="invalid tenant name"):
        await books.billing.invoice("Not A Tenant", "2026-03", caller=PLATFORM)
    with pytest.raises(PermissionDenied, match="reading the invoices of tenant 'other'"):
        await books.billing.invoice("other", "2026-03", caller=ACME_ADMIN)
    with pytest.raises(PermissionDenied):
        await books.billing.finalize("acme", "2026-02", caller=ACME_ADMIN)
    # The current month is a draft anyone of the tenant's admins may read.
    assert (await books.billing.invoice("acme", "2026-03", caller=ACME_ADMIN)).number == ""


async def test_a_price_in_another_currency_is_never_mixed_in(books: Books) -> None:
    books.store.set_price(PriceRecord("requests", "", "2026-03-01", "1.00", "EUR", at("2026-02-20")))
    books.use("2026-03-02", "requests", "fp32", 1000)
    books.clock.now = at("2026-04-02")
    with pytest.raises(FailedPrecondition, match="is in EUR but the book is in USD"):
        await books.billing.invoice("acme", MARCH)


async def test_storage_is_priced_per_gb_month_of_the_months_own_length(books: Books) -> None:
    books.clock.now = at("2026-01-20")
    await books.price("storage_byte_days", "3.00", day="2026-02-01")
    # 10 GB for 14 of February's 28 days: half a month of 10 GB = 5 GB-months = 15.00.
    books.storage.rows = [
        BillableRecord(f"2026-02-{d:02d}", "acme", "storage_byte_days", "", 10**10) for d in range(1, 15)
    ]
    books.clock.now = at("2026-03-05")
    invoice = await books.billing.invoice("acme", "2026-02")
    assert [(line.quantity, str(line.amount), line.unit) for line in invoice.lines] == [
        (14 * 10**10, "15.00", "GB-month")
    ]
    assert invoice.month == "2026-02"


async def test_one_gateway_process_refreshes_the_budget_gauge(books: Books) -> None:
    refreshed: list[str] = []

    class Counted(Billing):
        def __init__(self, name: str) -> None:
            super().__init__(books.store, [], "USD")
            self.name = name

        async def refresh_budgets(self) -> None:
            refreshed.append(self.name)

    url = f"sqlite:///{books.path}"
    first = BudgetWatch(Counted("first"), LeaderLock(url, "gateway-billing"), 0)
    second = BudgetWatch(Counted("second"), LeaderLock(url, "gateway-billing"), 0)
    for _ in range(3):
        await first.refresh()
        await second.refresh()
    assert refreshed == ["first"] * 3
    await first.close()  # that process stops: the next round of another takes over
    await second.refresh()
    assert refreshed[-1] == "second"
    await second.close()
