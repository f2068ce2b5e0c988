"""Fixtures every suite may use."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

POSTGRES_SERVER = "postgresql://postgres@127.0.0.1:5432"


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        message = f"PostgreSQL is not reachable on 127.0.0.1:5432 as user postgres: {exc}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI must provide it)")
        pytest.skip(message)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database (SQLAlchemy URL), dropped afterwards. Skips locally when
    the server is missing; fails under CI, where the PostgreSQL path must be tested."""
    name = f"maas_test_{uuid.uuid4().hex[:12]}"
    with _admin_connection() as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with _admin_connection() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
