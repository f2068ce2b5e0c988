"""Checks shared by every service's edge: resource names, id prefixes and pagination."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from dataclasses import dataclass
from datetime import date

from services.common.errors import InvalidArgument, NotFound

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A generated id (a job's, an API key's) may be given by a prefix: at least this many characters
# past its fixed start ("job-"), so that a stray "j" is not a search.
MIN_ID_PREFIX = 4
# An ambiguous prefix is refused naming at most this many of the ids it matches; a store asks
# for one more to know there are more.
MATCHES_NAMED = 5
# Usage read by day (billing): a range of at most this many days per call, a year and a month.
MAX_DAY_RANGE = 400
DAY_PATTERN = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def check_name(kind: str, value: str) -> str:
    """Names of tenants, models, aliases, datasets and deployments share one rule."""
    if not value:
        raise InvalidArgument(f"{kind} name is required")
    if not NAME_PATTERN.match(value):
        raise InvalidArgument(
            f"invalid {kind} name {value[:80]!r}: use 1-63 lower-case letters, digits and dashes, "
            "starting with a letter"
        )
    return value


def check_id_prefix(kind: str, value: str, start: str = "") -> None:
    """`value` is long enough to name one `kind` id by its prefix."""
    shortest = len(start) + MIN_ID_PREFIX
    if len(value) < shortest:
        raise InvalidArgument(
            f"{kind} {value[:80]!r} is too short: give the whole id or a prefix of at least "
            f"{shortest} characters" + (f" ({start} and {MIN_ID_PREFIX} more)" if start else "")
        )


def one_match(kind: str, prefix: str, matches: list[str], scope: str = "") -> str:
    """The id `prefix` names among the ids that start with it (up to MATCHES_NAMED + 1 of them, in
    the caller's reach): the one match, or the id equal to `prefix`. None matching is NotFound (as
    an unknown id); several are refused naming them."""
    if prefix in matches:
        return prefix
    if not matches:
        raise NotFound(f"{kind} {prefix[:80]!r} not found{scope}")
    if len(matches) == 1:
        return matches[0]
    named = ", ".join(matches[:MATCHES_NAMED]) + (", ..." if len(matches) > MATCHES_NAMED else "")
    raise InvalidArgument(f"{kind} prefix {prefix!r} matches more than one ({named}): give more characters")


def check_day_range(start_day: str, end_day: str, max_days: int = MAX_DAY_RANGE) -> tuple[date, date]:
    """An inclusive range of UTC days, each written YYYY-MM-DD, at most `max_days` long."""
    first, last = _day("start_day", start_day), _day("end_day", end_day)
    if first > last:
        raise InvalidArgument(f"start_day {first} is after end_day {last}")
    if (last - first).days + 1 > max_days:
        raise InvalidArgument(
            f"{first} to {last} is {(last - first).days + 1} days: ask for at most {max_days} days at a time"
        )
    return first, last


def _day(field: str, value: str) -> date:
    if not value:
        raise InvalidArgument(f"{field} is required: a UTC day written YYYY-MM-DD")
    if DAY_PATTERN.match(value):
        with contextlib.suppress(ValueError):  # a day that does not exist, e.g. 2026-02-30
            return date.fromisoformat(value)
    raise InvalidArgument(f"{field} {value[:20]!r} is not a day: write YYYY-MM-DD (UTC)")


@dataclass(frozen=True)
class Page:
    """Keyset pagination: `after` is the sort key of the last item of the previous page."""

    size: int
    after: str

    @classmethod
    def parse(cls, page_size: int, page_token: str) -> Page:
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if not page_token:
            return cls(size, "")
        try:
            after = base64.b64decode(page_token.encode(), altchars=b"-_", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidArgument("invalid page_token: pass back next_page_token unchanged") from None
        return cls(size, after)

    @staticmethod
    def token_after(last_key: str) -> str:
        return base64.urlsafe_b64encode(last_key.encode()).decode()
