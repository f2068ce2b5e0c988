"""Download is its own permission, as the registry enforces it: the gateway asserts the caller's
role (CALLER_ROLE_KEY); readers never download, a no-download model only to admins; a call with
no role is another MaaS service (the inference service loading a model keeps its access). Also
UpdateModel: its mask, and that only an admin lifts the no-download mark."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from maas.registry.v1 import registry_pb2 as pb
from maas.tiers import PLATFORM_SOURCE, SOURCE_METADATA_KEY, UPLOAD_SOURCE

from services.common.channels import CALLER_ROLE_KEY
from services.inference.artifacts import ArtifactCache, Registry
from tests.unit.registry.conftest import (
    TOKEN,
    TenantStub,
    dataset_requests,
    expect_status,
    make_onnx,
    upload_requests,
)

DENIED = grpc.StatusCode.PERMISSION_DENIED


def as_role(channel: grpc.aio.Channel, role: str, tenant: str = "tenant-a") -> TenantStub:
    """The stub of a call the gateway forwarded for an API key with `role`."""
    stub = TenantStub(channel, tenant)
    stub.metadata = (*stub.metadata, (CALLER_ROLE_KEY, role))
    return stub


async def download_dataset(stub: TenantStub, dataset: str, version: int) -> bytes:
    request = pb.DownloadDatasetVersionRequest(dataset=dataset, version=version)
    return b"".join([part.chunk async for part in stub.DownloadDatasetVersion(request)])


def update(name: str, paths: list[str], **fields) -> pb.UpdateModelRequest:
    return pb.UpdateModelRequest(model=pb.Model(name=name, **fields), update_mask=FieldMask(paths=paths))


async def test_readers_never_download_weights_or_data(stub: TenantStub, channel) -> None:
    weights = make_onnx()
    await stub.create_model("digits")
    await stub.upload("digits", weights, format=pb.ARTIFACT_FORMAT_ONNX)
    await stub.CreateDataset(pb.CreateDatasetRequest(name="rows", format=pb.DATASET_FORMAT_CSV, target_column="y"))
    await stub.UploadDatasetVersion(dataset_requests("rows", b"x,y\n1,0\n"))

    reader = as_role(channel, "reader")
    await expect_status(DENIED, reader.download("digits", 1), "needs a developer or admin API key")
    await expect_status(DENIED, download_dataset(reader, "rows", 1), "needs a developer or admin API key")
    # Refused before anything is looked up: a reader learns nothing from a name that does not exist.
    await expect_status(DENIED, reader.download("nothing", 1), "reader role")
    # A role the registry does not know is no downloader either (fail closed).
    for role in ("", "superuser", "ADMIN"):
        await expect_status(DENIED, as_role(channel, role).download("digits", 1))

    for role in ("developer", "admin"):
        assert (await as_role(channel, role).download("digits", 1))[1] == weights
        assert await download_dataset(as_role(channel, role), "rows", 1) == b"x,y\n1,0\n"


async def test_a_no_download_model_gives_its_weights_to_admins_and_services_only(
    stub: TenantStub, channel, tmp_path
) -> None:
    weights = make_onnx(0.25)
    developer = as_role(channel, "developer")
    created = await developer.create_model("secret", no_download=True)
    assert created.no_download
    version = await developer.upload("secret", weights, format=pb.ARTIFACT_FORMAT_ONNX)  # uploads stay open

    error = await expect_status(DENIED, developer.download("secret", 1), "model 'secret' is marked no-download")
    assert "only an admin key" in error.details() and "--allow-download" in error.details()
    assert (await as_role(channel, "admin").download("secret", 1))[1] == weights
    # No role: the inference service or the trainer, which serve and optimize it.
    assert (await stub.download("secret", 1))[1] == weights
    cache = ArtifactCache(tmp_path / "artifacts", Registry(channel, TOKEN, timeout=10))
    loaded = await cache.fetch("tenant-a", "secret", 1, version.sha256)
    assert loaded.read_bytes() == weights

    # Seen the same way everywhere; another tenant has no such model at all.
    assert (await stub.GetModel(pb.GetModelRequest(name="secret"))).model.no_download
    assert [m.no_download for m in (await stub.ListModels(pb.ListModelsRequest())).models] == [True]
    await expect_status(grpc.StatusCode.NOT_FOUND, as_role(channel, "admin", "tenant-b").download("secret", 1))


async def test_update_model_marks_and_only_an_admin_lifts_the_mark(stub: TenantStub, channel) -> None:
    developer, admin = as_role(channel, "developer"), as_role(channel, "admin")
    await stub.create_model("digits", description="first", labels={"team": "a"})
    await stub.upload("digits", make_onnx(), format=pb.ARTIFACT_FORMAT_ONNX)

    marked = (await developer.UpdateModel(update("digits", ["no_download"], no_download=True))).model
    assert marked.no_download and marked.description == "first" and dict(marked.labels) == {"team": "a"}
    assert marked.latest_version == 1
    await expect_status(DENIED, developer.download("digits", 1), "no-download")

    error = await expect_status(
        DENIED, developer.UpdateModel(update("digits", ["no_download"], no_download=False)), "only an admin key"
    )
    assert "developer role" in error.details()
    # The refused change left everything as it was, the mark included, even beside other fields.
    await expect_status(
        DENIED, developer.UpdateModel(update("digits", ["description", "no_download"], description="x"))
    )
    still = (await stub.GetModel(pb.GetModelRequest(name="digits"))).model
    assert still.no_download and still.description == "first"

    # Other fields change freely and keep the mark.
    renamed = (await developer.UpdateModel(update("digits", ["description", "labels"], description="second"))).model
    assert renamed.no_download and renamed.description == "second" and dict(renamed.labels) == {}

    lifted = (await admin.UpdateModel(update("digits", ["no_download"], no_download=False))).model
    assert not lifted.no_download
    assert (await developer.download("digits", 1))[1] == make_onnx()
    # Allowing downloads of a model that allows them already is no lift: a developer may.
    assert not (await developer.UpdateModel(update("digits", ["no_download"], no_download=False))).model.no_download


@pytest.mark.parametrize(
    ("request_", "code", "match"),
    [
        (update("digits", []), grpc.StatusCode.INVALID_ARGUMENT, "update_mask is required"),
        (update("digits", ["name"]), grpc.StatusCode.INVALID_ARGUMENT, "cannot update ['name']"),
        (update("digits", ["latest_version"]), grpc.StatusCode.INVALID_ARGUMENT, "updatable fields are"),
        (update("Bad Name", ["description"]), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (update("digits", ["description"], description="x" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "at most"),
        (update("digits", ["labels"], labels={"k": "\x00"}), grpc.StatusCode.INVALID_ARGUMENT, "NUL"),
        (update("missing", ["description"]), grpc.StatusCode.NOT_FOUND, "'missing' not found"),
        (update("missing", ["no_download"]), grpc.StatusCode.NOT_FOUND, "'missing' not found"),
    ],
)
async def test_bad_updates_are_refused(stub: TenantStub, channel, request_, code, match) -> None:
    await stub.create_model("digits", description="kept")
    await expect_status(code, as_role(channel, "developer").UpdateModel(request_), match)
    assert (await stub.GetModel(pb.GetModelRequest(name="digits"))).model.description == "kept"


async def test_another_tenant_cannot_mark_or_lift(stub: TenantStub, channel) -> None:
    await stub.create_model("digits", no_download=True)
    hostile = as_role(channel, "admin", "tenant-b")
    await expect_status(
        grpc.StatusCode.NOT_FOUND, hostile.UpdateModel(update("digits", ["no_download"], no_download=False))
    )
    assert (await stub.GetModel(pb.GetModelRequest(name="digits"))).model.no_download


async def test_the_registry_records_who_registered_a_version_and_nobody_else_can(stub: TenantStub, channel) -> None:
    """maas.source prices a version's tier: only versions a MaaS service registered may sell below fp32."""
    developer = as_role(channel, "developer")
    await developer.create_model("digits")
    uploaded = await developer.upload("digits", make_onnx(0.1), format=pb.ARTIFACT_FORMAT_ONNX)
    assert uploaded.metadata[SOURCE_METADATA_KEY] == UPLOAD_SOURCE
    made = await stub.upload("digits", make_onnx(0.2), format=pb.ARTIFACT_FORMAT_ONNX)  # the trainer: no role
    assert made.metadata[SOURCE_METADATA_KEY] == PLATFORM_SOURCE

    forged = upload_requests(
        "digits", make_onnx(0.3), format=pb.ARTIFACT_FORMAT_ONNX, precision="int8",
        metadata={SOURCE_METADATA_KEY: PLATFORM_SOURCE},
    )
    claimed = (await developer.UploadVersion(forged)).version  # the claim is replaced, not believed
    assert claimed.metadata[SOURCE_METADATA_KEY] == UPLOAD_SOURCE and claimed.precision == "int8"
