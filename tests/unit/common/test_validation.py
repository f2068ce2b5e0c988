from __future__ import annotations

from datetime import date

import pytest

from services.common.errors import InvalidArgument
from services.common.validation import MAX_DAY_RANGE, MAX_PAGE_SIZE, Page, check_day_range, check_name


@pytest.mark.parametrize("name", ["a", "digits-mlp", "m2", "a" * 63])
def test_good_names(name: str) -> None:
    assert check_name("model", name) == name


@pytest.mark.parametrize("name", ["", "A", "1abc", "a_b", "a" * 64, "a b", "ä", "-a"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="model name"):
        check_name("model", name)


def test_page_tokens_round_trip_and_sizes_are_capped() -> None:
    page = Page.parse(0, Page.token_after("model-7"))
    assert page.after == "model-7" and page.size == 50
    assert Page.parse(10**6, "").size == MAX_PAGE_SIZE


@pytest.mark.parametrize("size, token", [(-1, ""), (10, "%%%"), (10, "////")])
def test_bad_paging(size: int, token: str) -> None:
    with pytest.raises(InvalidArgument):
        Page.parse(size, token)


def test_a_day_range_is_inclusive_and_may_span_the_longest_range() -> None:
    assert check_day_range("2026-03-01", "2026-03-01") == (date(2026, 3, 1), date(2026, 3, 1))
    first, last = check_day_range("2025-01-01", "2026-02-04")
    assert (last - first).days + 1 == MAX_DAY_RANGE


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("", "2026-03-01", "start_day is required: a UTC day written YYYY-MM-DD"),
        ("2026-03-01", "", "end_day is required"),
        ("2026-3-1", "2026-03-02", r"start_day '2026-3-1' is not a day: write YYYY-MM-DD \(UTC\)"),
        ("20260301", "2026-03-02", "start_day '20260301' is not a day"),
        ("2026-02-30", "2026-03-02", "start_day '2026-02-30' is not a day"),
        ("2026-03-01", "2026-03-01T00:00", "end_day '2026-03-01T00:00' is not a day"),
        ("2026-03-02", "2026-03-01", "start_day 2026-03-02 is after end_day 2026-03-01"),
        ("2025-01-01", "2026-02-05", "2025-01-01 to 2026-02-05 is 401 days: ask for at most 400 days at a time"),
    ],
)
def test_bad_day_ranges_say_what_to_write(start: str, end: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_day_range(start, end)
