"""The price book's arithmetic: what a month of usage costs. Plain Python and Decimal, no I/O.

Usage arrives as rows per UTC day, resource and tier in each resource's base unit. A price
applies from its effective day until the next price of the same resource and tier, so each
day's usage is priced at the price of its day and an invoice line covers the days of one
price. A tier without a price of its own takes the resource's tier-less price.

A plan's allowances cover a month's earliest priced usage first (by day, then tier name); a
tier's own allowance is used before the resource's tier-less one. Amounts are rounded half-even
to the currency's minor unit once per line (and per covered part of a line); subtotal,
allowances and total are sums of rounded amounts, so they always add up."""

from __future__ import annotations

import bisect
import calendar
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

from maas.tiers import TIERS

from services.common.errors import FailedPrecondition, InvalidArgument
from services.gateway.store import AllowanceRecord, BillableRecord, CreditNoteRecord, PriceRecord


@dataclass(frozen=True)
class Resource:
    name: str
    tiered: bool
    unit: str  # what a price pays for
    base_units: int  # base units per priced unit; for storage, byte-days per GB in one day


GB = 10**9
RESOURCES = {
    resource.name: resource
    for resource in (
        Resource("requests", True, "1000 requests", 1000),
        Resource("input_tokens", True, "1000 tokens", 1000),
        Resource("output_tokens", True, "1000 tokens", 1000),
        Resource("embedding_tokens", True, "1000 tokens", 1000),
        Resource("training_cpu_seconds", False, "CPU-second", 1),
        Resource("training_gpu_seconds", False, "GPU-second", 1),
        # Priced per GB-month: the byte-days of a month / 1e9 / the month's days.
        Resource("storage_byte_days", False, "GB-month", GB),
        Resource("replica_seconds", True, "replica-hour", 3600),
    )
}
STORAGE = "storage_byte_days"
RESOURCE_ORDER = {name: index for index, name in enumerate(RESOURCES)}

# Currencies whose minor unit is not the cent (ISO 4217); every other has two decimals.
MINOR_UNIT_DIGITS = {
    "JPY": 0,
    "KRW": 0,
    "VND": 0,
    "CLP": 0,
    "ISK": 0,
    "BHD": 3,
    "KWD": 3,
    "OMR": 3,
    "JOD": 3,
    "TND": 3,
}
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")
PRICE_PATTERN = re.compile(r"^\d{1,12}(\.\d{1,12})?$")
MONTH_PATTERN = re.compile(r"^(\d{4})-(\d{2})$")
# Enough digits that no product or quotient of a quantity (int64) and a price is ever rounded
# before the one rounding per line.
EXACT = Context(prec=80)


def minor_unit_digits(currency: str) -> int:
    return MINOR_UNIT_DIGITS.get(currency, 2)


def round_money(value: Decimal, currency: str) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-minor_unit_digits(currency)), rounding=ROUND_HALF_EVEN)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """An amount already rounded to the currency's minor unit, as an integer of those units."""
    return int(amount.scaleb(minor_unit_digits(currency)))


def check_currency(currency: str) -> str:
    if not CURRENCY_PATTERN.match(currency):
        raise ValueError(f"billing currency {currency!r} is not an ISO 4217 code such as USD or EUR")
    return currency


def parse_price(text: str) -> Decimal:
    """A unit price: a non-negative decimal with at most 12 digits either side of the point."""
    if not PRICE_PATTERN.match(text):
        raise InvalidArgument(
            f"price {text[:40]!r} is not an amount: write a non-negative decimal such as 0.40 "
            "(at most 12 digits before and after the point, no sign or exponent)"
        )
    return Decimal(text)


def parse_money(text: str, currency: str, what: str) -> Decimal:
    """An amount of money: non-negative, in the currency's minor unit at most (12.34 for USD)."""
    digits = minor_unit_digits(currency)
    pattern = rf"^\d{{1,15}}(\.\d{{1,{digits}}})?$" if digits else r"^\d{1,15}$"
    if not re.match(pattern, text):
        example = "12.50" if digits == 2 else "1250" if digits == 0 else "12.500"
        raise InvalidArgument(
            f"{what} {text[:40]!r} is not an amount of {currency}: write a non-negative decimal such as "
            f"{example} (at most {digits} decimal places)"
        )
    return Decimal(text)


def check_resource(resource: str, tier: str) -> Resource:
    """A billable resource and a tier it has ("" for any tier, the only one of an untiered one)."""
    known = RESOURCES.get(resource)
    if known is None:
        raise InvalidArgument(f"unknown resource {resource[:40]!r}: use one of {', '.join(RESOURCES)}")
    if tier and not known.tiered:
        raise InvalidArgument(f"{resource} has no tiers: leave the tier out")
    if tier and tier not in TIERS:
        raise InvalidArgument(
            f"unknown tier {tier[:40]!r}: use one of {', '.join(TIERS)}, or none for every tier"
        )
    return known


@dataclass(frozen=True, order=True)
class Month:
    year: int
    number: int

    @classmethod
    def parse(cls, text: str, what: str = "month") -> Month:
        match = MONTH_PATTERN.match(text)
        if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1970:
            raise InvalidArgument(f"{what} {text[:20]!r} is not a month: write YYYY-MM (UTC), e.g. 2026-12")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def of(cls, day: date) -> Month:
        return cls(day.year, day.month)

    @property
    def days(self) -> int:
        return calendar.monthrange(self.year, self.number)[1]

    @property
    def first_day(self) -> date:
        return date(self.year, self.number, 1)

    @property
    def last_day(self) -> date:
        return date(self.year, self.number, self.days)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.number:02d}"


def parse_day(text: str, what: str) -> date:
    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"{what} {text[:20]!r} is not a day: write YYYY-MM-DD (UTC)") from None


@dataclass(frozen=True)
class Line:
    resource: str
    tier: str
    quantity: int
    unit_price: Decimal
    amount: Decimal
    unit: str
    first_day: str
    last_day: str


@dataclass(frozen=True)
class Unpriced:
    resource: str
    tier: str
    quantity: int


@dataclass(frozen=True)
class Invoice:
    tenant: str
    month: str
    currency: str
    plan: str
    lines: tuple[Line, ...]
    included: tuple[Line, ...]  # the parts of lines the plan's allowances covered
    unpriced: tuple[Unpriced, ...]
    subtotal: Decimal
    allowances: Decimal
    total: Decimal
    # Set once finalized: the stored invoice's number and time, and its credit notes.
    number: str = ""
    finalize_time: datetime | None = None
    credit_notes: tuple[CreditNoteRecord, ...] = field(default=())

    @property
    def balance(self) -> Decimal:
        return self.total - sum((Decimal(note.amount) for note in self.credit_notes), Decimal(0))

    def document(self) -> str:
        """The computed invoice as canonical JSON, as a finalized one is stored."""
        body = {
            "tenant": self.tenant,
            "month": self.month,
            "currency": self.currency,
            "plan": self.plan,
            "lines": [_line_document(line) for line in self.lines],
            "included": [_line_document(line) for line in self.included],
            "unpriced": [vars(item) for item in self.unpriced],
            "subtotal": str(self.subtotal),
            "allowances": str(self.allowances),
            "total": str(self.total),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_document(cls, document: str) -> Invoice:
        body = json.loads(document)
        return cls(
            tenant=body["tenant"],
            month=body["month"],
            currency=body["currency"],
            plan=body["plan"],
            lines=tuple(_line_of(item) for item in body["lines"]),
            included=tuple(_line_of(item) for item in body["included"]),
            unpriced=tuple(Unpriced(**item) for item in body["unpriced"]),
            subtotal=Decimal(body["subtotal"]),
            allowances=Decimal(body["allowances"]),
            total=Decimal(body["total"]),
        )


def _line_document(line: Line) -> dict[str, object]:
    return {**vars(line), "unit_price": str(line.unit_price), "amount": str(line.amount)}


def _line_of(item: dict) -> Line:  # type: ignore[type-arg]
    return Line(**{**item, "unit_price": Decimal(item["unit_price"]), "amount": Decimal(item["amount"])})


class PriceBook:
    """The prices of one currency, looked up by resource, tier and day."""

    def __init__(self, prices: Iterable[PriceRecord], currency: str) -> None:
        self.currency = currency
        self._by_key: dict[tuple[str, str], list[PriceRecord]] = defaultdict(list)
        for price in sorted(prices, key=lambda p: p.effective_day):
            self._by_key[(price.resource, price.tier)].append(price)

    def price_on(self, resource: str, tier: str, day: str) -> PriceRecord | None:
        """The tier's own price in force on `day`, else the resource's tier-less one."""
        for key in ((resource, tier), (resource, "")) if tier else ((resource, ""),):
            history = self._by_key.get(key, [])
            index = bisect.bisect_right([p.effective_day for p in history], day)
            if index:
                price = history[index - 1]
                if price.currency != self.currency:
                    raise FailedPrecondition(
                        f"the price of {price.resource}{'/' + price.tier if price.tier else ''} from "
                        f"{price.effective_day} is in {price.currency} but the book is in {self.currency} "
                        "(MAAS_BILLING_CURRENCY): set that price again in the book's currency"
                    )
                return price
        return None


@dataclass
class _Part:
    """One invoice line while it is summed: the usage of one resource and tier at one price."""

    price: PriceRecord
    quantity: int = 0
    covered: int = 0
    first_day: str = ""
    last_day: str = ""
    covered_first: str = ""
    covered_last: str = ""


def price_invoice(
    tenant: str,
    month: Month,
    currency: str,
    usage: Iterable[BillableRecord],
    prices: Iterable[PriceRecord],
    plan: str = "",
    allowances: Sequence[AllowanceRecord] = (),
) -> Invoice:
    """The invoice of `tenant` for `month`: the same input always gives the same invoice."""
    daily: dict[tuple[str, str, str], int] = defaultdict(int)
    for row in usage:
        if row.quantity:
            daily[(row.resource, row.day, row.tier)] += row.quantity
    book = PriceBook(prices, currency)
    left = {(a.resource, a.tier): a.quantity for a in allowances}
    parts: dict[tuple[str, str, str, str], _Part] = {}
    unpriced: dict[tuple[str, str], int] = defaultdict(int)
    # The month's earliest usage first, so that allowances cover it first.
    for resource, day, tier in sorted(daily, key=lambda k: (RESOURCE_ORDER.get(k[0], len(RESOURCES)), k)):
        quantity = daily[(resource, day, tier)]
        price = book.price_on(resource, tier, day) if resource in RESOURCES else None
        if price is None:
            unpriced[(resource, tier)] += quantity
            continue
        part = parts.setdefault(
            (resource, tier, price.tier, price.effective_day), _Part(price, first_day=day)
        )
        part.quantity += quantity
        part.last_day = day
        covered = 0
        for key in ((resource, tier), (resource, "")) if tier else ((resource, ""),):
            take = min(left.get(key, 0), quantity - covered)
            if take:
                left[key] -= take
                covered += take
        if covered:
            part.covered += covered
            part.covered_first = part.covered_first or day
            part.covered_last = day
    lines, included = [], []
    for (resource, tier, _, _), part in sorted(
        parts.items(), key=lambda item: (RESOURCE_ORDER[item[0][0]], item[0][1], item[1].first_day)
    ):
        lines.append(
            _line(resource, tier, part.quantity, part, month, currency, part.first_day, part.last_day)
        )
        if part.covered:
            included.append(
                _line(
                    resource, tier, part.covered, part, month, currency, part.covered_first, part.covered_last
                )
            )
    subtotal = sum((line.amount for line in lines), round_money(Decimal(0), currency))
    covered_amount = sum((line.amount for line in included), round_money(Decimal(0), currency))
    return Invoice(
        tenant=tenant,
        month=str(month),
        currency=currency,
        plan=plan,
        lines=tuple(lines),
        included=tuple(included),
        unpriced=tuple(Unpriced(r, t, q) for (r, t), q in sorted(unpriced.items())),
        subtotal=subtotal,
        allowances=covered_amount,
        total=subtotal - covered_amount,
    )


def _line(
    resource: str, tier: str, quantity: int, part: _Part, month: Month, currency: str, first: str, last: str
) -> Line:
    base_units = RESOURCES[resource].base_units * (month.days if resource == STORAGE else 1)
    unit_price = Decimal(part.price.amount)
    with localcontext(EXACT):
        amount = Decimal(quantity) * unit_price / base_units
    return Line(
        resource=resource,
        tier=tier,
        quantity=quantity,
        unit_price=unit_price,
        amount=round_money(amount, currency),
        unit=RESOURCES[resource].unit,
        first_day=first,
        last_day=last,
    )


def forecast(month_to_date: Decimal, days_elapsed: int, days_in_month: int, currency: str) -> Decimal:
    """The month's spend if the rest of it costs what its days so far cost on average."""
    with localcontext(EXACT):
        whole_month = month_to_date / days_elapsed * days_in_month
    return round_money(whole_month, currency)
