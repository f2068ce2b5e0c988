"""Checks shared by every service's edge: resource names and pagination."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from services.common.errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


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
