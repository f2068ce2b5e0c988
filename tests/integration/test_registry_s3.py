"""The registry's S3-compatible blob store against a real S3-compatible server (SeaweedFS), and
the whole registry over it: the bucket holds ciphertext only."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from maas.registry.v1 import registry_pb2

from services.common.errors import DataLoss
from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.s3_blobs import S3BlobStore
from services.registry.server import create_app, open_blob_store
from tests.support.s3 import ACCESS_KEY, SECRET_KEY, S3Server, run_s3_server
from tests.unit.registry.conftest import MARKER, TOKEN, TenantStub, expect_status, marked_onnx

pytestmark = pytest.mark.slow

DATA = b"weights " * 100_000


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    yield from run_s3_server(tmp_path_factory.mktemp("weed"))


@pytest.fixture
def store(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    settings = RegistrySettings(
        home=tmp_path, registry_s3_bucket=s3_server.bucket, registry_s3_endpoint_url=s3_server.endpoint_url,
        registry_s3_prefix=tmp_path.name,
    )
    blobs = open_blob_store(settings)
    assert isinstance(blobs, S3BlobStore)
    return blobs


def put(store: S3BlobStore, data: bytes, declared: str | None = None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    writer = store.begin_write()
    for start in range(0, len(data), 65536):
        writer.write(data[start:start + 65536])
    writer.commit(declared or digest, len(data))
    return digest


def test_a_committed_blob_reads_back_and_deletes(store: S3BlobStore) -> None:
    digest = put(store, DATA)
    put(store, DATA)  # the same bytes again: one object
    with store.open(digest) as stream:
        assert stream.read() == DATA
    assert list(store.digests()) == [digest]
    assert list(store.temp_dir.iterdir()) == []
    store.delete(digest)
    with pytest.raises(FileNotFoundError):
        store.open(digest)
    assert list(store.digests()) == []


def test_bytes_that_do_not_match_never_reach_the_bucket(store: S3BlobStore) -> None:
    with pytest.raises(DataLoss, match="sha256 mismatch"):
        put(store, DATA, declared="0" * 64)
    assert list(store.digests()) == []
    assert list(store.temp_dir.iterdir()) == []


def test_chunked_reads_stream_a_large_blob(store: S3BlobStore) -> None:
    big = bytes(range(256)) * 40_000  # 10 MB: a multipart upload
    digest = put(store, big)
    received = bytearray()
    with store.open(digest) as stream:
        while chunk := stream.read(1 << 20):
            received += chunk
    assert bytes(received) == big


@pytest.fixture
async def registry_on_s3(s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The whole registry (encryption on, as by default) over the bucket."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    settings = RegistrySettings(
        home=tmp_path, registry_addr="127.0.0.1:0", internal_token=TOKEN, registry_s3_bucket=s3_server.bucket,
        registry_s3_endpoint_url=s3_server.endpoint_url, registry_s3_prefix=f"{tmp_path.name}-registry",
    )
    async with running(await create_app(settings)) as server, \
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        store = open_blob_store(settings)
        assert isinstance(store, S3BlobStore)
        yield TenantStub(channel, "tenant-a"), store


async def test_the_bucket_holds_ciphertext_only_and_damage_is_data_loss(registry_on_s3) -> None:
    stub, store = registry_on_s3
    artifact = marked_onnx(3 * 1024 * 1024)
    digest = hashlib.sha256(artifact).hexdigest()
    await stub.create_model("big")
    await stub.upload("big", artifact, format=registry_pb2.ARTIFACT_FORMAT_ONNX)
    assert (await stub.download("big", 1))[1] == artifact

    (stored,) = [store.client.get_object(Bucket=store.bucket, Key=store.key_of(name))["Body"].read()
                 for name in store.digests()]
    assert MARKER not in stored and len(stored) > len(artifact)
    assert list(store.temp_dir.iterdir()) == []

    damaged = bytearray(stored)
    damaged[len(damaged) // 2] ^= 0x01
    store.client.put_object(Bucket=store.bucket, Key=store.key_of(digest), Body=bytes(damaged))
    await expect_status(grpc.StatusCode.DATA_LOSS, stub.download("big", 1), f"version 1 of model 'big' (sha256 {digest})")
