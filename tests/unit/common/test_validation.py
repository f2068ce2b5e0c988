from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.validation import MAX_PAGE_SIZE, Page, check_name


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
