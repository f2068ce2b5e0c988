"""Billing's SQL on a real PostgreSQL (throwaway database per run): the migration, an exact
invoice, gap-free invoice numbers when gateways finalize at once, and credit notes that never
pass the invoice's total under concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect

from services.common.database import make_engine, upgrade
from services.gateway.billing_service import Billing
from services.gateway.billing_sources import MeteredUsage
from services.gateway.server import MIGRATIONS
from services.gateway.store import BillableRecord, CreditNoteRecord, GatewayStore, PriceRecord, TenantRecord

pytestmark = pytest.mark.postgres
NOW = datetime(2026, 4, 10, tzinfo=UTC)


def at_once(count: int, work: Callable[[int], None]) -> None:
    start = threading.Barrier(count)

    def run(index: int) -> None:
        start.wait()
        work(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


async def test_billing_on_postgres(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    upgrade(engine, MIGRATIONS)
    upgrade(engine, MIGRATIONS)  # a second start-up finds the schema current
    assert {"prices", "plans", "invoices", "credit_notes", "billing_counters"} <= set(
        inspect(engine).get_table_names()
    )
    store = GatewayStore(engine)
    tenants = [f"t{index:02d}" for index in range(10)]
    try:
        for tenant in tenants:
            store.create_tenant(TenantRecord(tenant, "", NOW))
        store.set_price(PriceRecord("requests", "int8", "2026-03-01", "0.50", "USD", NOW))
        store.set_price(PriceRecord("requests", "int8", "2026-03-16", "0.70", "USD", NOW))
        store.add_billable_usage(
            [
                BillableRecord("2026-03-15", "t00", "requests", "int8", 3000),
                BillableRecord("2026-03-16", "t00", "requests", "int8", 1000),
            ]
        )
        billing = Billing(store, [MeteredUsage(store)], "USD", clock=lambda: NOW)
        invoice = await billing.invoice("t00", "2026-03")
        assert [(line.quantity, str(line.amount)) for line in invoice.lines] == [
            (3000, "1.50"),
            (1000, "0.70"),
        ]

        # Gateways with their own connections finalize every tenant twice, all at once.
        stores = [GatewayStore(make_engine(postgres_url)) for _ in range(4)]
        numbers: dict[str, set[str]] = {tenant: set() for tenant in tenants}

        def finalize(index: int) -> None:
            tenant = tenants[index // 2]
            stored = stores[index % 4].finalize_invoice(tenant, "2026-03", "USD", 220, "{}", NOW)
            numbers[tenant].add(stored.number)

        at_once(len(tenants) * 2, finalize)
        assert all(len(found) == 1 for found in numbers.values()), numbers
        assert sorted(n for found in numbers.values() for n in found) == [
            f"INV-2026-03-{n:04d}" for n in range(1, len(tenants) + 1)
        ]

        # Twelve credit notes of 0.50 against a total of 2.20: four fit, numbered without gaps.
        number = next(iter(numbers["t00"]))
        notes: list[CreditNoteRecord | None] = []

        def credit(index: int) -> None:
            note = CreditNoteRecord("", number, "t00", "0.50", f"credit {index}", NOW)
            notes.append(stores[index % 4].add_credit_note(note, 50, "CN-2026-04"))

        at_once(12, credit)
        issued = sorted(note.number for note in notes if note is not None)
        assert issued == [f"CN-2026-04-{n:04d}" for n in range(1, 5)]
        stored = store.get_invoice_by_number(number)
        assert stored is not None and stored.credited_minor == 200 and len(stored.credit_notes) == 4
        for other in stores:
            other.engine.dispose()
    finally:
        engine.dispose()
