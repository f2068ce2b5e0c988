"""The registry's SQL paths against a real PostgreSQL: migration, numbering under concurrency
(dataset deletes too), aliases, tenant isolation. Each run gets a throwaway database, dropped at the end."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from maas.common.v1 import common_pb2
from onnx import TensorProto, helper
from sqlalchemy import inspect

from services.common.database import make_engine, upgrade
from services.common.errors import FailedPrecondition, NotFound
from services.registry.blobs import LocalBlobStore
from services.registry.encryption import BlobEncryption, open_keyring
from services.registry.server import MIGRATIONS
from services.registry.service import Registry, VersionUpload
from services.registry.store import ArtifactFormat, DatasetFormat, RegistryStore

pytestmark = pytest.mark.postgres

@pytest.fixture
def registry(postgres_url: str, tmp_path: Path) -> Iterator[Registry]:
    engine = make_engine(postgres_url)
    upgrade(engine, MIGRATIONS)
    upgrade(engine, MIGRATIONS)  # idempotent
    assert {"models", "versions", "aliases", "datasets", "dataset_versions"} <= set(
        inspect(engine).get_table_names()
    )
    store = RegistryStore(engine)
    yield Registry(
        store,
        LocalBlobStore(tmp_path / "blobs"),
        encryption=BlobEncryption(store, open_keyring(tmp_path / "kek", store), enabled=True),
        chunk_bytes=64 * 1024,
        max_artifact_bytes=1 << 30,
    )
    engine.dispose()


def onnx_model(weight: float) -> bytes:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [4, 2], [weight] * 8)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def header(model: str, data: bytes) -> VersionUpload:
    return VersionUpload(
        model=model,
        format=ArtifactFormat.ONNX,
        signature=common_pb2.Signature(
            inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
            outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[2])],
        ),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        metrics={"accuracy": 0.5},
        metadata={"note": "postgres"},
    )


async def chunks_of(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


async def upload(registry: Registry, tenant: str, model: str, data: bytes) -> int:
    version = await registry.upload_version(tenant, header(model, data), chunks_of(data))
    return version.version


async def test_core_flow_on_postgres(registry: Registry) -> None:
    await registry.create_model("acme", "digits", "on postgres", {"db": "pg"})
    artifacts = [onnx_model(i / 10) for i in range(8)]
    numbers = await asyncio.gather(*(upload(registry, "acme", "digits", data) for data in artifacts))
    assert sorted(numbers) == list(range(1, 9))
    assert (await registry.get_model("acme", "digits")).latest_version == 8

    first_page, token = await registry.list_versions("acme", "digits", 5, "")
    second_page, last = await registry.list_versions("acme", "digits", 5, token)
    assert [v.version for v in first_page + second_page] == list(range(1, 9)) and last == ""

    record, chunks = await registry.download_version("acme", "digits", numbers[3])
    assert b"".join([chunk async for chunk in chunks]) == artifacts[3]
    assert record.metrics == {"accuracy": 0.5}

    await registry.set_alias("acme", "digits", "production", 2)
    assert (await registry.get_version("acme", "digits", None, "production")).version == 2
    with pytest.raises(FailedPrecondition):
        await registry.archive_version("acme", "digits", 2)
    await registry.archive_version("acme", "digits", 1)
    with pytest.raises(FailedPrecondition):
        await registry.set_alias("acme", "digits", "staging", 1)

    # Another tenant sees nothing of acme's and may reuse its names.
    for attempt in (
        registry.get_model("rival", "digits"),
        registry.get_version("rival", "digits", 1, ""),
        registry.download_version("rival", "digits", 1),
        registry.set_alias("rival", "digits", "production", 1),
        registry.upload_version("rival", header("digits", artifacts[0]), chunks_of(artifacts[0])),
    ):
        with pytest.raises(NotFound):
            await attempt
    assert (await registry.list_models("rival", 10, ""))[0] == []
    await registry.create_model("rival", "digits", "", {})
    assert await upload(registry, "rival", "digits", artifacts[0]) == 1

    await registry.delete_model("acme", "digits")
    with pytest.raises(NotFound):
        await registry.get_model("acme", "digits")
    assert (await registry.get_model("rival", "digits")).latest_version == 1


async def test_one_data_key_for_bytes_uploaded_at_once_and_a_rotation_keeps_them(registry: Registry) -> None:
    """Uploads of the same bytes meanwhile share the blob's data key (the table's row decides, not
    the process), and a KEK rotation re-wraps it on PostgreSQL as on SQLite."""
    data = onnx_model(0.7)
    for tenant in ("acme", "rival"):
        await registry.create_model(tenant, "digits", "", {})
    await asyncio.gather(*(upload(registry, tenant, "digits", data) for tenant in ("acme", "rival") * 3))
    rotation = await registry.rotate_kek()
    assert rotation.rewrapped == 1 and rotation.kek_id != rotation.previous_kek_id
    for tenant in ("acme", "rival"):
        for number in (1, 2, 3):
            _, chunks = await registry.download_version(tenant, "digits", number)
            assert b"".join([chunk async for chunk in chunks]) == data


def test_concurrent_deletes_of_a_dataset_end_once_and_its_name_numbers_on(postgres_url: str) -> None:
    """Racing deletes: one takes the dataset and records its last number, the others hear
    NOT_FOUND; racing uploads to the dataset made again under the name number on from it."""
    engine = make_engine(postgres_url)
    upgrade(engine, MIGRATIONS)
    store = RegistryStore(engine)
    store.create_dataset("racer", "rows", "", DatasetFormat.NPZ, "")
    for index in range(3):
        store.add_dataset_version("racer", "rows", f"{index:064x}", 10)

    def delete_once(_: int) -> str:
        try:
            store.delete_dataset("racer", "rows")
        except NotFound:
            return "not found"
        return "deleted"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(delete_once, range(4)))
    assert sorted(outcomes) == ["deleted", "not found", "not found", "not found"]

    store.create_dataset("racer", "rows", "", DatasetFormat.NPZ, "")
    with ThreadPoolExecutor(4) as pool:
        added = list(pool.map(lambda index: store.add_dataset_version("racer", "rows", f"{index + 9:064x}", 10), range(4)))
    assert sorted(version.version for version in added) == [4, 5, 6, 7]
    engine.dispose()
