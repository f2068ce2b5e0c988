from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def restore_umask() -> Iterator[None]:
    """The stack's entry points set the process's umask (make_private); keep it inside each test."""
    before = os.umask(0o022)
    yield
    os.umask(before)
