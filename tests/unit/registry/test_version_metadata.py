"""RegistryService.UpdateVersionMetadata through an in-process server: merging, removing, the
platform's keys, limits, tenancy; and the baseline's larger allowance at upload."""

from __future__ import annotations

import grpc
from maas.registry.v1 import registry_pb2 as pb

from services.common.summaries import BASELINE_KEY
from services.registry.service import MAX_BASELINE_CHARS, MAX_MAP_ENTRIES, MAX_VALUE_CHARS
from tests.unit.registry.conftest import TenantStub, expect_status

CODE = grpc.StatusCode


def update(stub: TenantStub, model: str, version: int, **entries: str):
    return stub.UpdateVersionMetadata(pb.UpdateVersionMetadataRequest(model=model, version=version, metadata=entries))


async def test_entries_merge_and_an_empty_value_removes_a_key(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await stub.create_model("iris")
    await stub.upload("iris", torchscript_bytes, metadata={"task": "classification", "note": "first"})
    response = await stub.UpdateVersionMetadata(pb.UpdateVersionMetadataRequest(
        model="iris", version=1,
        metadata={"maas.retrain.verdict": "accepted", "maas.retrain.comparison": "accuracy 0.95 vs 0.93", "note": ""},
    ))
    metadata = dict(response.version.metadata)
    assert metadata["maas.retrain.verdict"] == "accepted"
    assert metadata["maas.retrain.comparison"] == "accuracy 0.95 vs 0.93"
    assert metadata["task"] == "classification" and "note" not in metadata
    # The platform's own key stays as the upload wrote it.
    assert metadata["maas.source"]
    stored = (await stub.GetVersion(pb.GetVersionRequest(model="iris", version=1))).version
    assert dict(stored.metadata) == metadata
    again = (await update(stub, "iris", 1, **{"maas.retrain.verdict": "rejected"})).version
    assert again.metadata["maas.retrain.verdict"] == "rejected"
    assert again.metadata["maas.retrain.comparison"] == "accuracy 0.95 vs 0.93"


async def test_platform_keys_and_bad_requests_are_refused(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await stub.create_model("iris")
    await stub.upload("iris", torchscript_bytes)
    for key in ("maas.source", BASELINE_KEY, "maas.retrainer"):
        await expect_status(CODE.INVALID_ARGUMENT, update(stub, "iris", 1, **{key: "x"}), "is the platform's")
    await expect_status(CODE.INVALID_ARGUMENT, update(stub, "iris", 1), "metadata is required")
    await expect_status(CODE.INVALID_ARGUMENT, update(stub, "iris", 0, note="x"), "version must be")
    await expect_status(CODE.INVALID_ARGUMENT, update(stub, "Iris", 1, note="x"), "invalid model name")
    await expect_status(CODE.INVALID_ARGUMENT, update(stub, "iris", 1, note="x" * (MAX_VALUE_CHARS + 1)), "at most")
    await expect_status(CODE.INVALID_ARGUMENT, update(stub, "iris", 1, note="a\x00b"), "NUL")
    await expect_status(CODE.NOT_FOUND, update(stub, "iris", 2, note="x"), "no version 2")
    await expect_status(CODE.NOT_FOUND, update(stub, "nope", 1, note="x"), "not found")


async def test_the_merged_metadata_keeps_the_entry_limit(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await stub.create_model("iris")
    await stub.upload("iris", torchscript_bytes, metadata={f"k{i}": "v" for i in range(MAX_MAP_ENTRIES - 2)})
    # maas.source makes MAX_MAP_ENTRIES - 1; one more fits, two do not.
    await update(stub, "iris", 1, extra="1")
    await expect_status(CODE.INVALID_ARGUMENT, update(stub, "iris", 1, another="2"), "at most")
    await update(stub, "iris", 1, extra="", another="2")  # removing one makes room in the same call
    stored = (await stub.GetVersion(pb.GetVersionRequest(model="iris", version=1))).version
    assert "another" in stored.metadata and "extra" not in stored.metadata


async def test_another_tenants_version_is_not_found(
    stub: TenantStub, other_stub: TenantStub, torchscript_bytes: bytes
) -> None:
    await stub.create_model("iris")
    await stub.upload("iris", torchscript_bytes)
    await expect_status(CODE.NOT_FOUND, update(other_stub, "iris", 1, note="x"))
    stored = (await stub.GetVersion(pb.GetVersionRequest(model="iris", version=1))).version
    assert "note" not in stored.metadata


async def test_a_baseline_may_be_longer_than_other_entries(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await stub.create_model("iris")
    version = await stub.upload("iris", torchscript_bytes, metadata={BASELINE_KEY: "b" * (MAX_VALUE_CHARS * 4)})
    assert len(version.metadata[BASELINE_KEY]) == MAX_VALUE_CHARS * 4
    await expect_status(
        CODE.INVALID_ARGUMENT,
        stub.upload("iris", torchscript_bytes, metadata={BASELINE_KEY: "b" * (MAX_BASELINE_CHARS + 1)}),
        "at most",
    )
    await expect_status(
        CODE.INVALID_ARGUMENT, stub.upload("iris", torchscript_bytes, metadata={"other": "b" * (MAX_VALUE_CHARS + 1)}),
        "at most",
    )
