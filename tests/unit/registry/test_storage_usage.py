"""Storage byte-days for billing: samples of what each tenant stores (versions, archived ones
included, a shared blob counted per version, dataset versions; deleted ones not), the day's
largest sample, tenants apart, the sample at start, and GetStorageUsage: days carried forward,
its validation, and a tenant that can only read its own."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, timedelta

import grpc
import pytest
from maas.registry.v1 import registry_pb2 as pb

from services.common.database import make_engine, upgrade
from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.server import MIGRATIONS, create_app
from services.registry.storage_usage import StorageMeter, utc_today
from services.registry.store import (
    ArtifactFormat,
    DatasetFormat,
    Lineage,
    NewVersion,
    RegistryStore,
    StorageDay,
)
from tests.unit.registry.conftest import TenantStub, dataset_requests, expect_status

ROWS = b"x,y\n1,0\n2,1\n"


class Today:
    def __init__(self, day: date) -> None:
        self.day = day

    def __call__(self) -> date:
        return self.day


@pytest.fixture
def store(registry_settings: RegistrySettings, registry_server) -> Iterator[RegistryStore]:
    """A second view of the running registry's database, to sample on days of the test's choosing."""
    engine = make_engine(registry_settings.registry_database_url)
    yield RegistryStore(engine)
    engine.dispose()


def samples(store: RegistryStore, tenant: str, first: str, last: str) -> dict[str, int]:
    return {day.day: day.bytes for day in store.storage_days(tenant, first, last)}


async def upload_dataset(stub: TenantStub, name: str, rows: bytes) -> None:
    await stub.CreateDataset(pb.CreateDatasetRequest(name=name, format=pb.DATASET_FORMAT_CSV, target_column="y"))
    await stub.UploadDatasetVersion(dataset_requests(name, rows))


async def test_samples_follow_uploads_archives_and_deletes_keeping_each_days_largest(stub, store, onnx_bytes):
    today = Today(date(2026, 3, 1))
    meter = StorageMeter(store, today)
    size = len(onnx_bytes)
    await stub.create_model("m")
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    await meter.sample()
    assert samples(store, "tenant-a", "2026-03-01", "2026-03-31") == {"2026-03-01": size}
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)  # the same blob again: each version counts
    await meter.sample()
    assert samples(store, "tenant-a", "2026-03-01", "2026-03-31") == {"2026-03-01": 2 * size}

    today.day = date(2026, 3, 2)
    await stub.ArchiveVersion(pb.ArchiveVersionRequest(model="m", version=1))  # archived still counts
    await upload_dataset(stub, "rows", ROWS)
    await meter.sample()
    assert samples(store, "tenant-a", "2026-03-01", "2026-03-31")["2026-03-02"] == 2 * size + len(ROWS)

    today.day = date(2026, 3, 3)
    await meter.sample()
    await stub.DeleteModel(pb.DeleteModelRequest(name="m"))
    await meter.sample()  # smaller than the day's first sample: the day keeps the largest
    today.day = date(2026, 3, 4)
    await meter.sample()
    assert samples(store, "tenant-a", "2026-03-01", "2026-03-31") == {
        "2026-03-01": 2 * size,
        "2026-03-02": 2 * size + len(ROWS),
        "2026-03-03": 2 * size + len(ROWS),
        "2026-03-04": len(ROWS),
    }
    assert samples(store, "tenant-b", "2026-03-01", "2026-03-31") == {}, "another tenant's bytes"


async def test_tenants_are_sampled_apart_and_one_that_deleted_everything_is_sampled_at_zero(
    stub, other_stub, store, onnx_bytes
):
    today = Today(date(2026, 3, 1))
    meter = StorageMeter(store, today)
    await stub.create_model("m")
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    await other_stub.create_model("m")
    await other_stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    await upload_dataset(other_stub, "rows", ROWS)
    await meter.sample()
    await other_stub.DeleteModel(pb.DeleteModelRequest(name="m"))
    await stub.DeleteModel(pb.DeleteModelRequest(name="m"))
    for day in (2, 3):
        today.day = date(2026, 3, day)
        await meter.sample()
    assert samples(store, "tenant-a", "2026-03-01", "2026-03-31") == {
        "2026-03-01": len(onnx_bytes),
        "2026-03-02": 0,  # so that no later day carries the deleted bytes forward
    }
    assert samples(store, "tenant-b", "2026-03-01", "2026-03-31") == {
        "2026-03-01": len(onnx_bytes) + len(ROWS),
        "2026-03-02": len(ROWS),
        "2026-03-03": len(ROWS),
    }


async def test_usage_carries_the_latest_sample_forward_up_to_today_only(store, stub, onnx_bytes):
    today = Today(date(2026, 3, 10))
    meter = StorageMeter(store, today)
    await stub.create_model("m")
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    today.day = date(2026, 2, 27)
    await meter.sample()  # carried into March: the registry took no sample from the 28th to the 3rd
    today.day = date(2026, 3, 4)
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    await meter.sample()
    today.day = date(2026, 3, 6)
    size = len(onnx_bytes)
    assert await meter.usage("tenant-a", "2026-03-01", "2026-03-31") == [
        StorageDay("2026-03-01", size),
        StorageDay("2026-03-02", size),
        StorageDay("2026-03-03", size),
        StorageDay("2026-03-04", 2 * size),
        StorageDay("2026-03-05", 2 * size),
        StorageDay("2026-03-06", 2 * size),  # today, before its own sample: yesterday's bytes
    ]
    # Days before the tenant's first sample, and a range wholly after today, have nothing.
    assert [day.day for day in await meter.usage("tenant-a", "2026-02-25", "2026-02-28")] == [
        "2026-02-27",
        "2026-02-28",
    ]
    assert await meter.usage("tenant-a", "2026-04-01", "2026-04-30") == []
    assert await meter.usage("tenant-b", "2026-03-01", "2026-03-31") == []


async def test_a_starting_registry_samples_at_once_and_get_storage_usage_answers_it(
    registry_settings, stub, other_stub, onnx_bytes
):
    await stub.create_model("m")
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    today = utc_today()
    request = pb.GetStorageUsageRequest(start_day=(today - timedelta(days=30)).isoformat(), end_day=today.isoformat())
    # A second registry process on the same database (another replica, or a restart) samples
    # before it serves.
    async with running(await create_app(registry_settings)) as second:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            answer = await TenantStub(channel, "tenant-a").GetStorageUsage(request)
            stranger = await TenantStub(channel, "tenant-b").GetStorageUsage(request)
    assert [(day.day, day.bytes) for day in answer.days] == [(today.isoformat(), len(onnx_bytes))]
    assert list(stranger.days) == []


@pytest.mark.parametrize(
    ("start_day", "end_day", "message"),
    [
        ("", "2026-03-31", "start_day is required: a UTC day written YYYY-MM-DD"),
        ("2026-03-01", "2026-13-01", "end_day '2026-13-01' is not a day: write YYYY-MM-DD (UTC)"),
        ("2026-03-31", "2026-03-01", "start_day 2026-03-31 is after end_day 2026-03-01"),
        ("2025-01-01", "2026-03-01", "ask for at most 400 days at a time"),
    ],
)
async def test_get_storage_usage_refuses_a_bad_range_saying_why(stub, start_day, end_day, message):
    request = pb.GetStorageUsageRequest(start_day=start_day, end_day=end_day)
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.GetStorageUsage(request), message)


async def test_get_storage_usage_needs_the_internal_token(channel):
    forged = TenantStub(channel, "tenant-a", token="forged")
    request = pb.GetStorageUsageRequest(start_day="2026-03-01", end_day="2026-03-31")
    await expect_status(grpc.StatusCode.UNAUTHENTICATED, forged.GetStorageUsage(request))


@pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_store_samples_and_reads_on_sqlite_and_postgres(database, request, tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}" if database == "sqlite" else request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    try:
        upgrade(engine, MIGRATIONS)
        store = RegistryStore(engine)
        store.create_model("acme", "m", "", {})
        big = 5 * 10**9  # past 32 bits
        store.add_version("acme", "m", stored_version(big))
        store.create_dataset("acme", "rows", "", DatasetFormat.CSV, "y")
        store.add_dataset_version("acme", "rows", "b" * 64, 12)
        store.create_model("globex", "m", "", {})
        store.add_version("globex", "m", stored_version(7))
        assert store.sample_storage("2026-03-01") == {"acme": big + 12, "globex": 7}
        store.delete_model("acme", "m")
        assert store.sample_storage("2026-03-01") == {"acme": 12, "globex": 7}
        assert store.sample_storage("2026-03-02") == {"acme": 12, "globex": 7}
        assert store.storage_days("acme", "2026-03-02", "2026-03-31") == [
            StorageDay("2026-03-01", big + 12),  # the day's largest, which 2026-03-02 carries from
            StorageDay("2026-03-02", 12),
        ]
    finally:
        engine.dispose()


def stored_version(size: int) -> NewVersion:
    return NewVersion(
        format=ArtifactFormat.ONNX,
        signature=b"",
        sha256="a" * 64,
        size_bytes=size,
        metrics={},
        metadata={},
        lineage=Lineage(),
        precision="fp32",
    )
