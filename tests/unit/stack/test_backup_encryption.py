"""Backups of an encrypted registry: blobs travel sealed with their wrapped data keys, never the
key-encryption key; restore refuses to start until the KEK the backup needs is back, and refuses
to finish with a damaged blob; with the KEK back every version reads again."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import grpc
import pytest
from maas.registry.v1 import registry_pb2

from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.keys import load_kek_file, new_kek_text, write_kek_file
from services.registry.server import create_app
from services.stack.backup import BackupError, backup, restore
from tests.unit.registry.conftest import MARKER, TOKEN, TenantStub, marked_onnx

ARTIFACT = marked_onnx(2 * 1024 * 1024)


async def upload_into(home: Path, monkeypatch: pytest.MonkeyPatch) -> RegistrySettings:
    monkeypatch.setenv("MAAS_HOME", str(home))
    settings = RegistrySettings(registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_app(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = TenantStub(channel, "acme")
            await stub.create_model("big")
            await stub.upload("big", ARTIFACT, format=registry_pb2.ARTIFACT_FORMAT_ONNX)
    return settings


async def download_from(home: Path, monkeypatch: pytest.MonkeyPatch) -> bytes:
    monkeypatch.setenv("MAAS_HOME", str(home))
    settings = RegistrySettings(registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_app(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            return (await TenantStub(channel, "acme").download("big", 1))[1]


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [path for path in sorted(root.rglob("*")) if path.is_file() and needle in path.read_bytes()]


async def test_a_backup_holds_ciphertext_and_wrapped_keys_never_the_kek(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = await upload_into(tmp_path / "before", monkeypatch)
    kek_text = settings.registry_kek_file.read_text().strip()
    report = backup(tmp_path / "backup")
    assert report.blobs == 1 and report.skipped_blobs == []
    assert files_holding(tmp_path / "backup", MARKER) == []
    assert files_holding(tmp_path / "backup", kek_text.encode()) == []
    assert files_holding(tmp_path / "backup", base64.b64decode(kek_text)) == []
    assert not list((tmp_path / "backup").rglob("kek*"))
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["kek_ids"] == [load_kek_file(settings.registry_kek_file).id]


async def test_restore_waits_for_the_kek_and_then_every_version_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = await upload_into(tmp_path / "before", monkeypatch)
    backup(tmp_path / "backup")
    after = tmp_path / "after"
    monkeypatch.setenv("MAAS_HOME", str(after))

    with pytest.raises(BackupError, match=rf"{after / 'kek'} is missing.*put back the KEK file"):
        restore(tmp_path / "backup")
    write_kek_file(after / "kek", new_kek_text())  # e.g. `maas up` made a new one meanwhile
    with pytest.raises(BackupError, match="wrapped by kek-.* but the KEK at .* is kek-"):
        restore(tmp_path / "backup")
    assert not (after / "registry").exists()  # refused before anything was restored

    shutil.copyfile(settings.registry_kek_file, after / "kek")
    report = restore(tmp_path / "backup")
    assert report.blobs == 1 and report.skipped_blobs == []
    assert files_holding(after, MARKER) == []
    assert await download_from(after, monkeypatch) == ARTIFACT


async def test_restore_refuses_a_damaged_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = await upload_into(tmp_path / "before", monkeypatch)
    backup(tmp_path / "backup")
    (blob,) = [path for path in (tmp_path / "backup" / "blobs" / "sha256").rglob("*") if path.is_file()]
    damaged = bytearray(blob.read_bytes())
    damaged[-100] ^= 0x01
    blob.write_bytes(bytes(damaged))
    monkeypatch.setenv("MAAS_HOME", str(tmp_path / "after"))
    write_kek_file(tmp_path / "after" / "kek", settings.registry_kek_file.read_text())
    with pytest.raises(BackupError, match=f"blob {blob.name} is damaged"):
        restore(tmp_path / "backup")
