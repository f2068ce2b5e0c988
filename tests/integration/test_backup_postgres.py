"""Backup and restore of a service whose data lives in PostgreSQL (pg_dump / pg_restore)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from services.common.database import make_engine, upgrade
from services.registry.blobs import LocalBlobStore
from services.registry.server import MIGRATIONS
from services.registry.store import RegistryStore
from services.stack.backup import BackupError, backup, restore
from tests.conftest import POSTGRES_SERVER


@pytest.fixture
def empty_database(postgres_url: str) -> Iterator[str]:
    """A second throwaway database beside postgres_url's (the fixture made sure the server is up)."""
    name = f"maas_restore_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(f"{POSTGRES_SERVER}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgres_data_and_blobs_come_back(postgres_url: str, empty_database: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "before"))
    monkeypatch.setenv("MAAS_REGISTRY_DATABASE_URL", postgres_url)
    engine = make_engine(postgres_url)
    upgrade(engine, MIGRATIONS)
    RegistryStore(engine).create_model("acme", "digits", "a model", {})
    engine.dispose()
    data = b"artifact bytes"
    writer = LocalBlobStore(tmp_path / "before" / "registry" / "blobs").begin_write()
    writer.write(data)
    writer.commit(hashlib.sha256(data).hexdigest(), len(data))

    report = backup(tmp_path / "backup")
    assert report.databases == {"registry": "postgresql"} and report.blobs == 1

    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "after"))
    monkeypatch.setenv("MAAS_REGISTRY_DATABASE_URL", empty_database)
    restore(tmp_path / "backup")
    engine = make_engine(empty_database)
    try:
        assert RegistryStore(engine).get_model("acme", "digits").description == "a model"
    finally:
        engine.dispose()
    restored = LocalBlobStore(tmp_path / "after" / "registry" / "blobs")
    with restored.open(hashlib.sha256(data).hexdigest()) as blob:
        assert blob.read() == data

    with pytest.raises(BackupError, match="already has tables"):
        restore(tmp_path / "backup")
