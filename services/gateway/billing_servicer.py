"""gRPC face of BillingService: proto <-> domain only."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from maas.gateway.v1 import billing_pb2, billing_pb2_grpc

from services.gateway.audit import AuditLog
from services.gateway.audited import Describe, Handler, audited
from services.gateway.auth import current_caller
from services.gateway.billing import RESOURCES, Invoice, Line
from services.gateway.billing_service import Billing, ListedPrice, Spend, TenantPlan
from services.gateway.store import AllowanceRecord, BudgetRecord, CreditNoteRecord, PlanRecord

SERVICE = "maas.gateway.v1.BillingService"


def billing_change(describe: Describe) -> Callable[[Handler], Handler]:
    """Every billing change is audited, named by `describe`."""
    return audited(SERVICE, describe)


def _price_named(request: Any, response: Any) -> str:
    day = response.price.effective_day if response is not None else request.effective_day
    return f"{request.resource}{'/' + request.tier if request.tier else ''}@{day or 'today'}"


def _invoice_named(request: Any, response: Any) -> str:
    return response.invoice.number if response is not None else f"{request.tenant}/{request.month}"


def _credit_named(request: Any, response: Any) -> str:
    return response.credit_note.number if response is not None else request.invoice_number


class BillingServicer(billing_pb2_grpc.BillingServiceServicer):
    def __init__(self, billing: Billing, audit: AuditLog | None = None) -> None:
        self.billing = billing
        self.audit = audit

    @billing_change(_price_named)
    async def SetPrice(self, request, context):
        price = await self.billing.set_price(
            request.resource, request.tier, request.amount, request.effective_day, caller=current_caller()
        )
        return billing_pb2.SetPriceResponse(price=price_to_proto(price))

    async def ListPrices(self, request, context):
        listed = await self.billing.list_prices(request.include_superseded)
        return billing_pb2.ListPricesResponse(
            currency=self.billing.currency, prices=[price_to_proto(item) for item in listed]
        )

    @billing_change(lambda request, response: request.plan.name)
    async def DefinePlan(self, request, context):
        allowances = [AllowanceRecord(a.resource, a.tier, a.quantity) for a in request.plan.allowances]
        plan = await self.billing.define_plan(request.plan.name, allowances, caller=current_caller())
        return billing_pb2.DefinePlanResponse(plan=plan_to_proto(plan))

    async def ListPlans(self, request, context):
        plans = await self.billing.list_plans()
        return billing_pb2.ListPlansResponse(plans=[plan_to_proto(plan) for plan in plans])

    @billing_change(lambda request, response: f"{request.tenant}/{request.plan}")
    async def SetTenantPlan(self, request, context):
        assigned = await self.billing.set_tenant_plan(
            request.tenant, request.plan, request.start_month, caller=current_caller()
        )
        return billing_pb2.SetTenantPlanResponse(tenant_plan=tenant_plan_to_proto(assigned))

    async def GetInvoice(self, request, context):
        invoice = await self.billing.invoice(request.tenant, request.month, caller=current_caller())
        return billing_pb2.GetInvoiceResponse(invoice=invoice_to_proto(invoice))

    @billing_change(_invoice_named)
    async def FinalizeInvoice(self, request, context):
        invoice = await self.billing.finalize(request.tenant, request.month, caller=current_caller())
        return billing_pb2.FinalizeInvoiceResponse(invoice=invoice_to_proto(invoice))

    @billing_change(_credit_named)
    async def CreateCreditNote(self, request, context):
        note = await self.billing.credit(
            request.tenant, request.invoice_number, request.amount, request.reason, caller=current_caller()
        )
        return billing_pb2.CreateCreditNoteResponse(credit_note=credit_note_to_proto(note))

    async def GetSpend(self, request, context):
        spend = await self.billing.spend(request.tenant, caller=current_caller())
        return billing_pb2.GetSpendResponse(spend=spend_to_proto(spend))

    @billing_change(lambda request, response: request.tenant)
    async def SetBudget(self, request, context):
        budget = await self.billing.set_budget(request.tenant, request.amount, caller=current_caller())
        return billing_pb2.SetBudgetResponse(
            budget=budget_to_proto(request.tenant, budget, self.billing.currency)
        )


def price_to_proto(listed: ListedPrice) -> billing_pb2.Price:
    price = listed.price
    return billing_pb2.Price(
        resource=price.resource,
        tier=price.tier,
        amount=price.amount,
        currency=price.currency,
        unit=RESOURCES[price.resource].unit if price.resource in RESOURCES else "",
        effective_day=price.effective_day,
        scheduled=listed.scheduled,
        create_time=_timestamp(price.create_time),
    )


def plan_to_proto(plan: PlanRecord) -> billing_pb2.Plan:
    return billing_pb2.Plan(
        name=plan.name,
        allowances=[
            billing_pb2.Allowance(resource=a.resource, tier=a.tier, quantity=a.quantity)
            for a in plan.allowances
        ],
        create_time=_timestamp(plan.create_time),
    )


def tenant_plan_to_proto(assigned: TenantPlan) -> billing_pb2.TenantPlan:
    return billing_pb2.TenantPlan(
        tenant=assigned.tenant, plan=assigned.plan, start_month=assigned.start_month
    )


def line_to_proto(line: Line) -> billing_pb2.InvoiceLine:
    return billing_pb2.InvoiceLine(
        resource=line.resource,
        tier=line.tier,
        quantity=line.quantity,
        unit_price=str(line.unit_price),
        amount=str(line.amount),
        unit=line.unit,
        first_day=line.first_day,
        last_day=line.last_day,
    )


def credit_note_to_proto(note: CreditNoteRecord) -> billing_pb2.CreditNote:
    return billing_pb2.CreditNote(
        number=note.number,
        invoice_number=note.invoice_number,
        tenant=note.tenant,
        amount=note.amount,
        reason=note.reason,
        create_time=_timestamp(note.create_time),
    )


def invoice_to_proto(invoice: Invoice) -> billing_pb2.Invoice:
    proto = billing_pb2.Invoice(
        tenant=invoice.tenant,
        month=invoice.month,
        currency=invoice.currency,
        lines=[line_to_proto(line) for line in invoice.lines],
        subtotal=str(invoice.subtotal),
        allowances=str(invoice.allowances),
        total=str(invoice.total),
        number=invoice.number,
        finalized=bool(invoice.number),
        plan=invoice.plan,
        included=[line_to_proto(line) for line in invoice.included],
        unpriced=[
            billing_pb2.UnpricedUsage(resource=item.resource, tier=item.tier, quantity=item.quantity)
            for item in invoice.unpriced
        ],
        credit_notes=[credit_note_to_proto(note) for note in invoice.credit_notes],
        balance=str(invoice.balance),
    )
    if invoice.finalize_time is not None:
        proto.finalize_time.CopyFrom(_timestamp(invoice.finalize_time))
    return proto


def spend_to_proto(spend: Spend) -> billing_pb2.Spend:
    return billing_pb2.Spend(
        tenant=spend.tenant,
        month=spend.month,
        currency=spend.currency,
        month_to_date=str(spend.month_to_date),
        forecast=str(spend.forecast),
        budget=str(spend.budget) if spend.budget is not None else "",
        budget_used_ratio=spend.budget_used_ratio,
        days_elapsed=spend.days_elapsed,
        days_in_month=spend.days_in_month,
    )


def budget_to_proto(tenant: str, budget: BudgetRecord | None, currency: str) -> billing_pb2.Budget:
    if budget is None:  # removed
        return billing_pb2.Budget(tenant=tenant, currency=currency)
    return billing_pb2.Budget(
        tenant=budget.tenant,
        amount=budget.amount,
        currency=budget.currency,
        update_time=_timestamp(budget.update_time),
    )


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp
