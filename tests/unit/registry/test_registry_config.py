"""RegistrySettings defaults and the start-up work create_app does."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.server import create_app


def test_defaults_follow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_HOME", str(tmp_path))
    settings = RegistrySettings()
    assert settings.registry_database_url == settings.sqlite_url("registry")
    assert settings.registry_blob_dir == tmp_path / "registry" / "blobs"
    assert (settings.registry_addr, settings.registry_metrics_addr) == ("127.0.0.1:50052", "127.0.0.1:9152")
    assert settings.registry_chunk_bytes == 1024 * 1024


def test_explicit_values_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAAS_REGISTRY_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/registry")
    settings = RegistrySettings(home=tmp_path, registry_blob_dir=tmp_path / "elsewhere")
    assert settings.registry_database_url.startswith("postgresql+psycopg://")
    assert settings.registry_blob_dir == tmp_path / "elsewhere"


def test_download_chunks_must_fit_in_a_message(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="registry_chunk_bytes"):
        RegistrySettings(home=tmp_path, max_message_bytes=1024 * 1024, registry_chunk_bytes=1024 * 1024)


async def test_start_up_migrates_and_sweeps_leftover_uploads(tmp_path: Path) -> None:
    settings = RegistrySettings(home=tmp_path, registry_addr="127.0.0.1:0")
    leftover = settings.registry_blob_dir / "tmp" / "crashed.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half an upload")
    async with running(await create_app(settings)):
        assert not leftover.exists()
        assert (tmp_path / "registry" / "registry.db").exists()
