"""Encryption at rest through the real registry server, real crypto and real files: blobs on disk
hold ciphertext only; a flipped byte, a cut file, swapped chunks or a damaged data key are
DATA_LOSS naming the version, and nothing of the damaged chunk is sent; key rows live and die
with their blobs, a hostile tenant's upload included; a KEK rotation, even one killed with
SIGKILL half-way, keeps every version downloadable; the registry will not start without the KEK
its data keys need."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from maas.registry.v1 import registry_pb2

from services.common.server import RunningServer, running
from services.registry import encryption
from services.registry.config import RegistrySettings
from services.registry.envelope import CHUNK_BYTES, HEADER, NONCE_BYTES, TAG_BYTES
from services.registry.keys import load_kek_file, new_kek_text, write_kek_file
from services.registry.server import create_app
from tests.unit.registry.conftest import (
    MARKER,
    TOKEN,
    TenantStub,
    dataset_requests,
    expect_status,
    make_onnx,
    marked_onnx,
    upload_requests,
)

RECORD = NONCE_BYTES + CHUNK_BYTES + TAG_BYTES
ONNX = registry_pb2.ARTIFACT_FORMAT_ONNX
DATA_LOSS = grpc.StatusCode.DATA_LOSS


def settings_for(home: Path, **overrides) -> RegistrySettings:
    return RegistrySettings(home=home, registry_addr="127.0.0.1:0", internal_token=TOKEN, **overrides)


@asynccontextmanager
async def registry(settings: RegistrySettings) -> AsyncIterator[tuple[RunningServer, TenantStub, TenantStub]]:
    async with running(await create_app(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield server, TenantStub(channel, "tenant-a"), TenantStub(channel, "tenant-b")


def blob_path(settings: RegistrySettings, data: bytes) -> Path:
    digest = hashlib.sha256(data).hexdigest()
    return settings.registry_blob_dir / "sha256" / digest[:2] / digest


def key_rows(settings: RegistrySettings) -> list[tuple[str, bytes, str]]:
    with sqlite3.connect(settings.home / "registry" / "registry.db") as database:
        return database.execute("SELECT sha256, wrapped_key, kek_id FROM blob_keys ORDER BY sha256").fetchall()


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [path for path in sorted(root.rglob("*")) if path.is_file() and needle in path.read_bytes()]


async def download_until_refused(stub: TenantStub, model: str, version: int) -> tuple[bytes, grpc.aio.AioRpcError]:
    """The plaintext a download sent before it failed, and how it failed."""
    received = b""
    call = stub.DownloadVersion(registry_pb2.DownloadVersionRequest(model=model, version=version))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for message in call:
            received += message.chunk
    return received, failed.value


@pytest.fixture
def settings(tmp_path: Path) -> RegistrySettings:
    return settings_for(tmp_path / "home")


@pytest.fixture(scope="module")
def artifact() -> bytes:
    return marked_onnx(3 * CHUNK_BYTES + 12345)  # four sealed chunks, the last a partial one


async def test_blobs_on_disk_hold_ciphertext_only(settings: RegistrySettings, artifact: bytes) -> None:
    rows = b"a,b,label\n" + b"".join(b"%d,%d,%s\n" % (i, i * 2, MARKER) for i in range(20))
    async with registry(settings) as (_, stub, _):
        await stub.create_model("big")
        await stub.upload("big", artifact, format=ONNX)
        await stub.CreateDataset(
            registry_pb2.CreateDatasetRequest(
                name="rows", format=registry_pb2.DATASET_FORMAT_CSV, target_column="label"
            )
        )
        await stub.UploadDatasetVersion(dataset_requests("rows", rows))
        assert (await stub.download("big", 1))[1] == artifact
        dataset = stub.DownloadDatasetVersion(registry_pb2.DownloadDatasetVersionRequest(dataset="rows", version=1))
        assert b"".join([message.chunk async for message in dataset]) == rows
    # Nothing under MAAS_HOME holds the plaintext: not the blobs, the spool, the database or the KEK.
    assert files_holding(settings.home, MARKER) == []
    stored = blob_path(settings, artifact).read_bytes()
    assert len(stored) == HEADER.size + 4 * (NONCE_BYTES + TAG_BYTES) + len(artifact)
    assert list((settings.registry_blob_dir / "tmp").iterdir()) == []
    assert len(key_rows(settings)) == 2
    assert os.stat(settings.registry_kek_file).st_mode & 0o777 == 0o600


async def test_with_encryption_off_blobs_are_stored_as_sent_and_still_read_once_it_is_on(
    settings: RegistrySettings, artifact: bytes
) -> None:
    """The control for the test above (the search finds plaintext where there is some), and
    blobs from before encryption still read, shared as they are by a later upload of the same
    bytes."""
    async with registry(settings.model_copy(update={"registry_encryption": False})) as (_, stub, _):
        await stub.create_model("big")
        await stub.upload("big", artifact, format=ONNX)
    assert files_holding(settings.registry_blob_dir, MARKER) == [blob_path(settings, artifact)]
    async with registry(settings) as (_, stub, other):
        assert (await stub.download("big", 1))[1] == artifact
        await other.create_model("big")
        await other.upload("big", artifact, format=ONNX)
        assert (await other.download("big", 1))[1] == artifact
        await stub.create_model("new")
        await stub.upload("new", make_onnx(0.25), format=ONNX)
    assert key_rows(settings) == [(hashlib.sha256(make_onnx(0.25)).hexdigest(), *key_rows(settings)[0][1:])]
    assert files_holding(settings.registry_blob_dir, MARKER) == [blob_path(settings, artifact)]


def flip_in_chunk(sealed: bytearray, index: int) -> None:
    sealed[HEADER.size + index * RECORD + NONCE_BYTES + 100] ^= 0x01


def swap_first_chunks(sealed: bytearray) -> None:
    first = sealed[HEADER.size : HEADER.size + RECORD]
    sealed[HEADER.size : HEADER.size + RECORD] = sealed[HEADER.size + RECORD : HEADER.size + 2 * RECORD]
    sealed[HEADER.size + RECORD : HEADER.size + 2 * RECORD] = first


def cut_last_chunk(sealed: bytearray) -> None:
    del sealed[HEADER.size + 3 * RECORD :]


def cut_mid_chunk(sealed: bytearray) -> None:
    del sealed[HEADER.size + 2 * RECORD + 5000 :]


@pytest.mark.parametrize(
    ("damage", "whole_chunks_sent_at_most"),
    # A cut at a chunk boundary shows only at the end: the whole chunks before it are authentic.
    [(flip_in_chunk, 2), (swap_first_chunks, 0), (cut_last_chunk, 3), (cut_mid_chunk, 2)],
    ids=["flipped byte", "swapped chunks", "cut at a chunk boundary", "cut inside a chunk"],
)
async def test_damaged_ciphertext_is_data_loss_and_no_byte_of_it_is_sent(
    settings: RegistrySettings, artifact: bytes, damage, whole_chunks_sent_at_most: int
) -> None:
    async with registry(settings) as (_, stub, _):
        await stub.create_model("big")
        await stub.upload("big", artifact, format=ONNX)
        path = blob_path(settings, artifact)
        sealed = bytearray(path.read_bytes())
        if damage is flip_in_chunk:
            flip_in_chunk(sealed, 2)
        else:
            damage(sealed)
        path.write_bytes(bytes(sealed))
        received, error = await download_until_refused(stub, "big", 1)
    assert error.code() == DATA_LOSS
    assert "version 1 of model 'big'" in error.details() and hashlib.sha256(artifact).hexdigest() in error.details()
    assert "not served" in error.details()
    assert artifact.startswith(received) and len(received) <= whole_chunks_sent_at_most * CHUNK_BYTES


async def test_a_damaged_or_misplaced_data_key_is_data_loss(settings: RegistrySettings) -> None:
    one, two = make_onnx(0.1), make_onnx(0.2)
    async with registry(settings) as (_, stub, _):
        await stub.create_model("m")
        await stub.upload("m", one, format=ONNX)
        await stub.upload("m", two, format=ONNX)
        (first, first_key, _), (second, second_key, _) = key_rows(settings)
        with sqlite3.connect(settings.home / "registry" / "registry.db") as database:
            # Each row gets the other's wrapped key: bound to its own blob, neither unwraps.
            database.execute("UPDATE blob_keys SET wrapped_key = ? WHERE sha256 = ?", (second_key, first))
            database.execute("UPDATE blob_keys SET wrapped_key = ? WHERE sha256 = ?", (first_key, second))
        for number in (1, 2):
            await expect_status(DATA_LOSS, stub.download("m", number), "cannot be unwrapped")
        with sqlite3.connect(settings.home / "registry" / "registry.db") as database:
            database.execute("DELETE FROM blob_keys")
        await expect_status(DATA_LOSS, stub.download("m", 1), "encrypted but the registry holds no data key")


async def test_key_rows_live_and_die_with_their_blobs(settings: RegistrySettings, onnx_bytes: bytes) -> None:
    async with registry(settings) as (_, stub, other):
        for tenant in (stub, other):
            await tenant.create_model("m")
            await tenant.upload("m", onnx_bytes, format=ONNX)
        await stub.upload("m", onnx_bytes, format=ONNX)
        assert len(key_rows(settings)) == 1  # one blob, one data key, three versions
        # A failed upload of new bytes leaves no blob and no key.
        fresh = make_onnx(0.9)
        await expect_status(
            DATA_LOSS, stub.UploadVersion(upload_requests("m", fresh[:-1], format=ONNX, sha256=hashlib.sha256(fresh).hexdigest(), size_bytes=len(fresh) - 1)), "sha256 mismatch"
        )
        assert len(key_rows(settings)) == 1 and not blob_path(settings, fresh).exists()
        await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="m"))
        assert len(key_rows(settings)) == 1  # the other tenant's version still uses the blob
        await other.DeleteModel(registry_pb2.DeleteModelRequest(name="m"))
        assert key_rows(settings) == [] and not blob_path(settings, onnx_bytes).exists()


async def test_a_hostile_upload_declaring_anothers_bytes_leaves_them_readable(
    settings: RegistrySettings, onnx_bytes: bytes
) -> None:
    """Tenant B knows the sha256 of tenant A's model and uploads other bytes under it: refused,
    and A's blob and data key are untouched."""
    async with registry(settings) as (_, victim, mallory):
        await victim.create_model("m")
        await victim.upload("m", onnx_bytes, format=ONNX)
        before = key_rows(settings)
        await mallory.create_model("m")
        forged = make_onnx(0.75)
        await expect_status(
            DATA_LOSS,
            mallory.UploadVersion(
                upload_requests("m", forged, format=ONNX, sha256=hashlib.sha256(onnx_bytes).hexdigest())
            ),
            "sha256 mismatch",
        )
        assert key_rows(settings) == before
        assert (await victim.download("m", 1))[1] == onnx_bytes


async def upload_five(stub: TenantStub) -> list[bytes]:
    artifacts = [make_onnx(weight / 10) for weight in range(1, 6)]
    await stub.create_model("m")
    for artifact in artifacts:
        await stub.upload("m", artifact, format=ONNX)
    return artifacts


async def test_a_rotation_rewraps_every_key_and_keeps_every_version(settings: RegistrySettings) -> None:
    async with registry(settings) as (_, stub, _):
        artifacts = await upload_five(stub)
        before = load_kek_file(settings.registry_kek_file).id
        rotated = await stub.RotateKek(registry_pb2.RotateKekRequest())
        assert (rotated.rewrapped_keys, rotated.previous_kek_id) == (5, before)
        assert {kek for _, _, kek in key_rows(settings)} == {rotated.kek_id} != {before}
        for number, artifact in enumerate(artifacts, start=1):
            assert (await stub.download("m", number))[1] == artifact
        await stub.upload("m", marked_onnx(10), format=ONNX)  # new keys are wrapped by the new KEK
        assert {kek for _, _, kek in key_rows(settings)} == {rotated.kek_id}
    async with registry(settings) as (_, stub, _):
        for number, artifact in enumerate(artifacts, start=1):
            assert (await stub.download("m", number))[1] == artifact


# A rotation in a process of its own, with batches of two keys, killed with SIGKILL at one point.
ROTATE_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from services.common.database import make_engine
    from services.registry import encryption
    from services.registry.keys import Keyring
    from services.registry.store import RegistryStore

    database, kek_file, point = sys.argv[1:]
    encryption.REWRAP_BATCH = 2
    store = RegistryStore(make_engine(database))
    die = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    if point == "before-any-key":
        store.blob_keys_not_wrapped_by = die
    elif point == "after-one-batch":
        rewrap = store.rewrap_blob_keys
        store.rewrap_blob_keys = lambda old, new: (rewrap(old, new), die())
    elif point == "before-the-switch":
        Keyring.finish_rotation = die
    encryption.BlobEncryption(store, encryption.open_keyring(Path(kek_file), store), enabled=True).rotate()
    """
)


@pytest.mark.parametrize("point", ["before-any-key", "after-one-batch", "before-the-switch"])
async def test_a_rotation_killed_half_way_is_finished_at_the_next_start_and_loses_no_key(
    settings: RegistrySettings, point: str
) -> None:
    async with registry(settings) as (_, stub, _):
        artifacts = await upload_five(stub)
    original = load_kek_file(settings.registry_kek_file).id
    killed = subprocess.run(
        [sys.executable, "-c", ROTATE_AND_DIE, settings.registry_database_url, str(settings.registry_kek_file), point],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    next_kek = settings.registry_kek_file.with_name("kek.next")
    upcoming = load_kek_file(next_kek).id
    assert load_kek_file(settings.registry_kek_file).id == original
    rewrapped = [kek for _, _, kek in key_rows(settings)].count(upcoming)
    assert rewrapped == {"before-any-key": 0, "after-one-batch": 2, "before-the-switch": 5}[point]

    async with registry(settings) as (_, stub, _):
        for number, artifact in enumerate(artifacts, start=1):
            assert (await stub.download("m", number))[1] == artifact
    assert not next_kek.exists() and load_kek_file(settings.registry_kek_file).id == upcoming
    assert {kek for _, _, kek in key_rows(settings)} == {upcoming}


async def test_a_rotation_stopped_by_a_damaged_key_is_finished_by_the_next_call(
    settings: RegistrySettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encryption, "REWRAP_BATCH", 2)
    async with registry(settings) as (_, stub, _):
        artifacts = await upload_five(stub)
        await stub.create_model("broken")
        broken = make_onnx(0.95)
        await stub.upload("broken", broken, format=ONNX)
        with sqlite3.connect(settings.home / "registry" / "registry.db") as database:
            database.execute(
                "UPDATE blob_keys SET wrapped_key = zeroblob(60) WHERE sha256 = ?", (hashlib.sha256(broken).hexdigest(),)
            )
        original = load_kek_file(settings.registry_kek_file).id
        await expect_status(DATA_LOSS, stub.RotateKek(registry_pb2.RotateKekRequest()), hashlib.sha256(broken).hexdigest())
        upcoming = load_kek_file(settings.registry_kek_file.with_name("kek.next")).id
        # Half-way, keys wrapped by either KEK open.
        for number, artifact in enumerate(artifacts, start=1):
            assert (await stub.download("m", number))[1] == artifact

        await stub.DeleteModel(registry_pb2.DeleteModelRequest(name="broken"))
        rotated = await stub.RotateKek(registry_pb2.RotateKekRequest())
        assert (rotated.kek_id, rotated.previous_kek_id) == (upcoming, original)
        for number, artifact in enumerate(artifacts, start=1):
            assert (await stub.download("m", number))[1] == artifact
    assert {kek for _, _, kek in key_rows(settings)} == {upcoming}


async def test_the_registry_will_not_start_without_the_kek_its_keys_need(
    settings: RegistrySettings, onnx_bytes: bytes
) -> None:
    async with registry(settings) as (_, stub, _):
        await stub.create_model("m")
        await stub.upload("m", onnx_bytes, format=ONNX)
    kek = settings.registry_kek_file
    kept = kek.read_text()
    needed = load_kek_file(kek).id

    kek.unlink()
    with pytest.raises(SystemExit, match=f"{kek} is missing.*wrapped by {needed}: put back the KEK file"):
        await create_app(settings)
    assert not kek.exists()  # never replaced by a new one while data keys need the old

    write_kek_file(kek, new_kek_text())
    with pytest.raises(SystemExit, match=f"data keys in this registry are wrapped by {needed}"):
        await create_app(settings)

    write_kek_file(kek, kept)
    kek.chmod(0o644)
    with pytest.raises(SystemExit, match="open to other users.*chmod 600"):
        await create_app(settings)
    kek.write_text("not a key\n")
    kek.chmod(0o600)
    with pytest.raises(SystemExit, match="does not hold a key-encryption key"):
        await create_app(settings)

    write_kek_file(kek, kept)
    async with registry(settings) as (_, stub, _):
        assert (await stub.download("m", 1))[1] == onnx_bytes
