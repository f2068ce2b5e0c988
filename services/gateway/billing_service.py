"""Billing: the price book, plans, invoices, credit notes, spend and budgets (no gRPC here).

Who may do what: any caller lists prices and plans; a tenant's admin reads its own tenant's
invoices and spend (the role itself is checked by the authenticator); everything that changes
the book or an invoice needs a platform admin. `caller` None is a trusted in-process call.

An invoice is computed from the usage sources each time it is read, until the month is
finalized: then the invoice as computed is stored under a number and read from storage ever
after, whatever happens to usage or prices later. Corrections are credit notes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from prometheus_client import Gauge

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from services.common.errors import not_found as not_found_among
from services.common.leader import LeaderLock
from services.common.periodic import Periodic
from services.common.validation import check_name
from services.gateway.auth import Caller
from services.gateway.billing import (
    Invoice,
    Month,
    check_resource,
    forecast,
    parse_day,
    parse_money,
    parse_price,
    price_invoice,
    round_money,
    to_minor_units,
)
from services.gateway.billing_sources import UsageSource
from services.gateway.service import check_platform_admin
from services.gateway.store import (
    AllowanceRecord,
    BudgetRecord,
    CreditNoteRecord,
    GatewayStore,
    PlanRecord,
    PriceRecord,
    StoredInvoice,
    utc_now,
)

log = logging.getLogger(__name__)

# Set by one gateway process (the one holding the billing lock); when that one goes, its
# values go with it and the next holder's are the most recent.
BUDGET_USED = Gauge(
    "maas_billing_budget_used_ratio",
    "Part of a tenant's monthly budget its invoice total of the month so far has used (1 = all of it)",
    ["tenant"],
    multiprocess_mode="livemostrecent",
)
MAX_ALLOWANCES = 100
MAX_QUANTITY = 2**63 - 1
MAX_REASON = 1024


@dataclass(frozen=True)
class ListedPrice:
    price: PriceRecord
    scheduled: bool  # its effective day is after today


@dataclass(frozen=True)
class TenantPlan:
    tenant: str
    plan: str
    start_month: str


@dataclass(frozen=True)
class Spend:
    tenant: str
    month: str
    currency: str
    month_to_date: Decimal
    forecast: Decimal
    budget: Decimal | None
    budget_used_ratio: float
    days_elapsed: int
    days_in_month: int


class Billing:
    def __init__(
        self,
        store: GatewayStore,
        sources: Sequence[UsageSource],
        currency: str,
        finalize_grace_seconds: float = 3600.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.store = store
        self.sources = sources
        self.currency = currency
        self.finalize_grace = timedelta(seconds=finalize_grace_seconds)
        self.clock = clock
        self._budgeted: set[str] = set()  # tenants this process has set the gauge of

    def _today(self) -> date:
        return self.clock().astimezone(UTC).date()

    # --- the price book ----------------------------------------------------------------------
    async def set_price(
        self, resource: str, tier: str, amount: str, effective_day: str, *, caller: Caller | None = None
    ) -> ListedPrice:
        check_platform_admin(caller, "setting a price")
        check_resource(resource, tier)
        parse_price(amount)
        today = self._today()
        day = parse_day(effective_day, "effective day") if effective_day else today
        if day < today:
            raise InvalidArgument(
                f"effective day {day} is before today ({today}, UTC): usage of past days keeps the price of "
                "its day; give today or a later day"
            )
        price = PriceRecord(resource, tier, day.isoformat(), amount, self.currency, utc_now())
        await asyncio.to_thread(self.store.set_price, price)
        log.info("price set", extra={"resource": resource, "tier": tier, "amount": amount, "day": str(day)})
        return ListedPrice(price, scheduled=day > today)

    async def list_prices(self, include_superseded: bool = False) -> list[ListedPrice]:
        """By resource, tier and effective day: the price in force today and those scheduled
        after it (with `include_superseded`, also those they replaced)."""
        today = self._today().isoformat()
        listed: list[ListedPrice] = []
        every = await asyncio.to_thread(self.store.list_prices)
        for index, price in enumerate(every):
            following = every[index + 1] if index + 1 < len(every) else None
            replaced = (
                following is not None
                and (following.resource, following.tier) == (price.resource, price.tier)
                and following.effective_day <= today
            )
            if include_superseded or not replaced:
                listed.append(ListedPrice(price, price.effective_day > today))
        return listed

    # --- plans -------------------------------------------------------------------------------
    async def define_plan(
        self, name: str, allowances: Sequence[AllowanceRecord], *, caller: Caller | None = None
    ) -> PlanRecord:
        check_platform_admin(caller, "defining a plan")
        check_name("plan", name)
        if len(allowances) > MAX_ALLOWANCES:
            raise InvalidArgument(f"a plan has at most {MAX_ALLOWANCES} allowances")
        seen: set[tuple[str, str]] = set()
        for allowance in allowances:
            check_resource(allowance.resource, allowance.tier)
            key = (allowance.resource, allowance.tier)
            if key in seen:
                raise InvalidArgument(f"{_named(*key)} is given twice: give each resource and tier once")
            if not 0 < allowance.quantity <= MAX_QUANTITY:
                raise InvalidArgument(f"the allowance of {_named(*key)} must be between 1 and {MAX_QUANTITY}")
            seen.add(key)
        wanted = tuple(sorted(allowances, key=lambda a: (a.resource, a.tier)))
        stored = await asyncio.to_thread(self.store.define_plan, PlanRecord(name, wanted, utc_now()))
        if stored.allowances != wanted:
            raise AlreadyExists(
                f"plan {name!r} exists with other allowances ({_allowances(stored.allowances)}); plans "
                "never change, so that past invoices keep theirs: define a plan of another name and move "
                "tenants to it"
            )
        return stored

    async def list_plans(self) -> list[PlanRecord]:
        return await asyncio.to_thread(self.store.list_plans)

    async def set_tenant_plan(
        self, tenant: str, plan: str, start_month: str, *, caller: Caller | None = None
    ) -> TenantPlan:
        """The plan applies from the first day of `start_month` (the current month by default)."""
        check_platform_admin(caller, "setting a tenant's plan")
        await self._check_tenant(tenant)
        if not plan:
            raise InvalidArgument("plan is required: one of those `maas billing plan list` shows")
        current = Month.of(self._today())
        month = Month.parse(start_month, "start month") if start_month else current
        if month < current:
            raise InvalidArgument(
                f"start month {month} is over: a plan applies from the current month ({current}) or a "
                "later one"
            )
        plans = await asyncio.to_thread(self.store.list_plans)
        if plan not in {p.name for p in plans}:
            raise not_found_among("plan", plan, [p.name for p in plans])
        await asyncio.to_thread(self.store.set_tenant_plan, tenant, str(month), plan)
        log.info("tenant plan set", extra={"tenant": tenant, "plan": plan, "start_month": str(month)})
        return TenantPlan(tenant, plan, str(month))

    # --- invoices ----------------------------------------------------------------------------
    async def invoice(self, tenant: str, month_text: str, *, caller: Caller | None = None) -> Invoice:
        """The stored invoice of a finalized month, else the month's invoice computed now."""
        check_name("tenant", tenant)
        _check_reach(caller, tenant, "reading the invoices")
        await self._check_tenant(tenant)
        month = self._billable_month(month_text)
        stored = await asyncio.to_thread(self.store.get_invoice, tenant, str(month))
        if stored is not None:
            return _from_storage(stored)
        return await self._compute(tenant, month)

    async def finalize(self, tenant: str, month_text: str, *, caller: Caller | None = None) -> Invoice:
        """Stores the month's invoice under a number; finalizing again returns the stored one."""
        check_platform_admin(caller, "finalizing an invoice")
        await self._check_tenant(tenant)
        month = self._billable_month(month_text)
        stored = await asyncio.to_thread(self.store.get_invoice, tenant, str(month))
        if stored is not None:
            return _from_storage(stored)
        next_month = month.last_day + timedelta(days=1)
        ready = datetime(next_month.year, next_month.month, next_month.day, tzinfo=UTC) + self.finalize_grace
        if self.clock() < ready:
            raise FailedPrecondition(
                f"month {month} can be finalized from {ready:%Y-%m-%d %H:%M} UTC on, once it is over and its "
                "last usage has reached the books; until then `maas billing invoice` shows it as it stands"
            )
        invoice = await self._compute(tenant, month)
        stored = await asyncio.to_thread(
            self.store.finalize_invoice,
            tenant,
            str(month),
            invoice.currency,
            to_minor_units(invoice.total, invoice.currency),
            invoice.document(),
            utc_now(),
        )
        log.info("invoice finalized", extra={"tenant": tenant, "month": str(month), "number": stored.number})
        return _from_storage(stored)

    async def credit(
        self, tenant: str, invoice_number: str, amount_text: str, reason: str, *, caller: Caller | None = None
    ) -> CreditNoteRecord:
        """A credit note against a finalized invoice; credits never pass the invoice's total."""
        check_platform_admin(caller, "issuing a credit note")
        await self._check_tenant(tenant)
        if not invoice_number:
            raise InvalidArgument(
                "invoice number is required, e.g. INV-2026-12-0001 (`maas billing invoice --finalize`)"
            )
        stored = await asyncio.to_thread(self.store.get_invoice_by_number, invoice_number[:40])
        if stored is None or stored.tenant != tenant:
            raise NotFound(
                f"invoice {invoice_number[:40]!r} of tenant {tenant!r} not found: only finalized invoices "
                "have numbers"
            )
        amount = round_money(parse_money(amount_text, stored.currency, "amount"), stored.currency)
        if not amount:
            raise InvalidArgument("amount must be more than 0")
        if not reason.strip():
            raise InvalidArgument("reason is required: say why the invoice is corrected")
        if len(reason) > MAX_REASON:
            raise InvalidArgument(f"reason is longer than {MAX_REASON} characters")
        note = CreditNoteRecord("", stored.number, tenant, str(amount), reason, utc_now())
        series = f"CN-{Month.of(self._today())}"
        created = await asyncio.to_thread(
            self.store.add_credit_note, note, to_minor_units(amount, stored.currency), series
        )
        if created is None:
            balance = _from_storage(
                await asyncio.to_thread(self.store.get_invoice_by_number, stored.number) or stored
            ).balance
            raise FailedPrecondition(
                f"a credit of {amount} {stored.currency} is more than what is left of invoice "
                f"{stored.number} "
                f"({balance} {stored.currency} after its credit notes)"
            )
        log.info(
            "credit note issued", extra={"tenant": tenant, "invoice": stored.number, "number": created.number}
        )
        return created

    # --- spend and budgets -------------------------------------------------------------------
    async def spend(self, tenant: str, *, caller: Caller | None = None) -> Spend:
        """The current month so far, a forecast (the average day so far times the month's days,
        today counted as a whole day) and the budget."""
        check_name("tenant", tenant)
        _check_reach(caller, tenant, "reading the spend")
        await self._check_tenant(tenant)
        today = self._today()
        month = Month.of(today)
        invoice = await self._compute(tenant, month)
        budget = await asyncio.to_thread(self.store.get_budget, tenant)
        budget_amount = Decimal(budget.amount) if budget is not None else None
        return Spend(
            tenant=tenant,
            month=str(month),
            currency=invoice.currency,
            month_to_date=invoice.total,
            forecast=forecast(invoice.total, today.day, month.days, invoice.currency),
            budget=budget_amount,
            budget_used_ratio=float(invoice.total / budget_amount) if budget_amount else 0.0,
            days_elapsed=today.day,
            days_in_month=month.days,
        )

    async def set_budget(
        self, tenant: str, amount_text: str, *, caller: Caller | None = None
    ) -> BudgetRecord | None:
        """A monthly budget in the book's currency; 0 removes it (None is returned then)."""
        check_platform_admin(caller, "setting a budget")
        await self._check_tenant(tenant)
        amount = round_money(parse_money(amount_text, self.currency, "budget"), self.currency)
        if not amount:
            await asyncio.to_thread(self.store.delete_budget, tenant)
            if tenant in self._budgeted:
                BUDGET_USED.labels(tenant).set(0)
            return None
        budget = BudgetRecord(tenant, str(amount), self.currency, utc_now())
        await asyncio.to_thread(self.store.set_budget, budget)
        return budget

    async def refresh_budgets(self) -> None:
        """Sets the budget gauge of every tenant with a budget; a tenant whose budget was
        removed drops to 0. One tenant's failure (a source down) leaves its last value."""
        budgets = await asyncio.to_thread(self.store.list_budgets)
        for gone in self._budgeted - {b.tenant for b in budgets}:
            BUDGET_USED.labels(gone).set(0)
        self._budgeted = {b.tenant for b in budgets}
        month = Month.of(self._today())
        for budget in budgets:
            if budget.currency != self.currency:
                log.warning(
                    "budget in another currency than the book's; set it again",
                    extra={"tenant": budget.tenant},
                )
                continue
            try:
                invoice = await self._compute(budget.tenant, month)
            except Exception:
                log.exception("budget refresh failed for one tenant", extra={"tenant": budget.tenant})
                continue
            BUDGET_USED.labels(budget.tenant).set(float(invoice.total / Decimal(budget.amount)))

    # --- helpers -----------------------------------------------------------------------------
    async def _compute(self, tenant: str, month: Month) -> Invoice:
        first = month.first_day.isoformat()
        last = min(month.last_day, self._today()).isoformat()
        answers = await asyncio.gather(*(source.daily_usage(tenant, first, last) for source in self.sources))
        prices = await asyncio.to_thread(self.store.list_prices)
        plan_name = await asyncio.to_thread(self.store.tenant_plan, tenant, str(month))
        plan = await asyncio.to_thread(self.store.get_plan, plan_name) if plan_name else None
        usage = [row for rows in answers for row in rows]
        allowances = plan.allowances if plan is not None else ()
        return price_invoice(tenant, month, self.currency, usage, prices, plan_name, allowances)

    def _billable_month(self, text: str) -> Month:
        if not text:
            raise InvalidArgument("month is required: YYYY-MM (UTC), e.g. 2026-12")
        month = Month.parse(text)
        current = Month.of(self._today())
        if month > current:
            raise InvalidArgument(
                f"month {month} has not begun (it is {current} now, UTC): there is nothing to bill yet"
            )
        return month

    async def _check_tenant(self, tenant: str) -> None:
        check_name("tenant", tenant)
        if await asyncio.to_thread(self.store.get_tenant, tenant) is None:
            raise NotFound(f"tenant {tenant!r} not found")


class BudgetWatch:
    """Refreshes the budget gauge every `interval_seconds` in one gateway process: the one that
    holds the billing lock among all processes sharing the gateway database. Another takes the
    lock over when that one stops."""

    def __init__(self, billing: Billing, lock: LeaderLock, interval_seconds: float) -> None:
        self.billing = billing
        self.lock = lock
        self._rounds = Periodic("billing-budgets", self.refresh, interval_seconds)

    def start(self) -> None:
        self._rounds.start()

    async def close(self) -> None:
        await self._rounds.close()
        await self.lock.release()

    async def refresh(self) -> None:
        if await self.lock.try_acquire():
            await self.billing.refresh_budgets()


def _from_storage(stored: StoredInvoice) -> Invoice:
    return replace(
        Invoice.from_document(stored.document),
        number=stored.number,
        finalize_time=stored.finalize_time,
        credit_notes=stored.credit_notes,
    )


def _check_reach(caller: Caller | None, tenant: str, what: str) -> None:
    """A platform admin reaches every tenant; anyone else only its own."""
    if caller is not None and not caller.is_platform_admin and tenant != caller.tenant:
        raise PermissionDenied(
            f"{what} of tenant {tenant[:80]!r} needs a platform admin key or an admin key of that tenant; "
            f"API key {caller.key_id} is a {caller.role.name.lower()} key of tenant {caller.tenant!r}"
        )


def _named(resource: str, tier: str) -> str:
    return f"{resource}/{tier}" if tier else resource


def _allowances(allowances: Sequence[AllowanceRecord]) -> str:
    return ", ".join(f"{_named(a.resource, a.tier)}={a.quantity}" for a in allowances) or "none"
