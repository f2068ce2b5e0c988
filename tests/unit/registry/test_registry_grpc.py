"""Every RegistryService RPC through an in-process server: happy paths, bad inputs, tenancy."""

from __future__ import annotations

import asyncio
import io
import pickle

import grpc
import numpy as np
import pytest
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2 as pb

from services.common.server import running
from services.registry.config import RegistrySettings
from services.registry.server import create_app
from tests.unit.registry.conftest import (
    TOKEN,
    TenantStub,
    blob_files,
    dataset_requests,
    expect_status,
    linear_signature,
    make_onnx,
    sha256_of,
    temp_files,
    upload_requests,
    wait_until,
)


def committed_blobs(settings: RegistrySettings) -> set[str]:
    return {p.name for p in blob_files(settings) if p.parent.parent.name == "sha256"}


# Models


async def test_model_lifecycle(stub: TenantStub) -> None:
    created = await stub.create_model("digits", description="8x8 digits", labels={"team": "vision"})
    assert (created.name, created.description, dict(created.labels)) == (
        "digits",
        "8x8 digits",
        {"team": "vision"},
    )
    assert created.latest_version == 0 and created.create_time.seconds > 0
    got = (await stub.GetModel(pb.GetModelRequest(name="digits"))).model
    assert got == created
    listed = await stub.ListModels(pb.ListModelsRequest())
    assert [m.name for m in listed.models] == ["digits"] and listed.next_page_token == ""
    await stub.DeleteModel(pb.DeleteModelRequest(name="digits"))
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.GetModel(pb.GetModelRequest(name="digits")), "not found"
    )
    await expect_status(grpc.StatusCode.NOT_FOUND, stub.DeleteModel(pb.DeleteModelRequest(name="digits")))


async def test_duplicate_and_bad_model_names(stub: TenantStub) -> None:
    await stub.create_model("digits")
    await expect_status(grpc.StatusCode.ALREADY_EXISTS, stub.create_model("digits"), "already exists")
    for bad in ["", "Digits", "1digits", "a" * 64, "dig_its"]:
        await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.create_model(bad), "model name")
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.GetModel(pb.GetModelRequest(name="Bad!")))
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.create_model("x", description="a\x00b"), "NUL")


async def test_list_models_pages_through_everything(stub: TenantStub) -> None:
    names = [f"model-{i}" for i in range(5)]
    for name in reversed(names):
        await stub.create_model(name)
    seen, token, pages = [], "", 0
    while True:
        page = await stub.ListModels(pb.ListModelsRequest(page_size=2, page_token=token))
        seen += [m.name for m in page.models]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert (seen, pages) == (names, 3)
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ListModels(pb.ListModelsRequest(page_token="%%%")),
        "page_token",
    )
    await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.ListModels(pb.ListModelsRequest(page_size=-1)))


# Versions


async def test_upload_get_list_download(
    stub: TenantStub, torchscript_bytes: bytes, onnx_bytes: bytes
) -> None:
    await stub.create_model("linear")
    first = await stub.upload(
        "linear",
        torchscript_bytes,
        metrics={"accuracy": 0.97},
        metadata={"framework": "torch"},
        lineage=pb.Lineage(
            job_id="job-7", dataset="digits", dataset_version=3, hyperparameters={"lr": "0.01"}
        ),
        precision="fp32",
    )
    assert (first.model, first.version, first.state) == ("linear", 1, pb.VERSION_STATE_READY)
    assert first.format == pb.ARTIFACT_FORMAT_TORCHSCRIPT
    assert (first.sha256, first.size_bytes) == (sha256_of(torchscript_bytes), len(torchscript_bytes))
    assert first.signature == linear_signature()
    assert dict(first.metrics) == {"accuracy": 0.97} and dict(first.metadata) == {"framework": "torch", "maas.source": "platform"}
    assert first.lineage.job_id == "job-7" and dict(first.lineage.hyperparameters) == {"lr": "0.01"}
    assert first.precision == "fp32"
    second = await stub.upload("linear", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    assert (second.version, second.format) == (2, pb.ARTIFACT_FORMAT_ONNX)

    assert (await stub.GetVersion(pb.GetVersionRequest(model="linear", version=1))).version == first
    assert (await stub.GetModel(pb.GetModelRequest(name="linear"))).model.latest_version == 2
    listed = await stub.ListVersions(pb.ListVersionsRequest(model="linear", page_size=1))
    assert [v.version for v in listed.versions] == [1]
    rest = await stub.ListVersions(pb.ListVersionsRequest(model="linear", page_token=listed.next_page_token))
    assert [v.version for v in rest.versions] == [2] and rest.next_page_token == ""

    version, data = await stub.download("linear", 1)
    assert version == first and data == torchscript_bytes
    assert (await stub.download("linear", 2))[1] == onnx_bytes


async def test_download_streams_in_chunks(stub: TenantStub, registry_settings: RegistrySettings) -> None:
    await stub.create_model("m")
    data = make_onnx(0.25, outputs=20_000)  # ~320 KB: several download chunks
    await stub.upload("m", data, format=pb.ARTIFACT_FORMAT_ONNX)
    responses = [r async for r in stub.DownloadVersion(pb.DownloadVersionRequest(model="m", version=1))]
    chunks = [r.chunk for r in responses[1:]]
    assert len(chunks) == -(-len(data) // registry_settings.registry_chunk_bytes)
    assert all(len(chunk) <= registry_settings.registry_chunk_bytes for chunk in chunks)
    assert b"".join(chunks) == data


async def test_get_version_selectors(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await stub.create_model("m")
    await stub.upload("m", torchscript_bytes)
    for request in [
        pb.GetVersionRequest(model="m"),
        pb.GetVersionRequest(model="m", version=1, alias="production"),
        pb.GetVersionRequest(model="m", version=0),
        pb.GetVersionRequest(model="m", alias="Not An Alias"),
    ]:
        await expect_status(grpc.StatusCode.INVALID_ARGUMENT, stub.GetVersion(request))
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.GetVersion(pb.GetVersionRequest(model="m", version=2))
    )
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        stub.GetVersion(pb.GetVersionRequest(model="m", alias="production")),
        "alias",
    )
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        stub.DownloadVersion(pb.DownloadVersionRequest(model="m", version=9)).read(),
    )


async def test_aliases_and_archiving(stub: TenantStub, torchscript_bytes: bytes, onnx_bytes: bytes) -> None:
    await stub.create_model("m")
    await stub.upload("m", torchscript_bytes)
    await stub.upload("m", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    alias = (await stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=1))).alias
    assert (alias.model, alias.name, alias.version) == ("m", "production", 1)
    await stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=2))
    await stub.SetAlias(pb.SetAliasRequest(model="m", alias="staging", version=1))
    by_alias = (await stub.GetVersion(pb.GetVersionRequest(model="m", alias="production"))).version
    assert by_alias.version == 2
    assert dict((await stub.GetModel(pb.GetModelRequest(name="m"))).model.aliases) == {
        "production": 2,
        "staging": 1,
    }

    await expect_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.ArchiveVersion(pb.ArchiveVersionRequest(model="m", version=1)),
        "staging",
    )
    await stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="staging"))
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="staging"))
    )
    archived = (await stub.ArchiveVersion(pb.ArchiveVersionRequest(model="m", version=1))).version
    assert archived.state == pb.VERSION_STATE_ARCHIVED
    await expect_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="staging", version=1)),
        "archived",
    )
    assert (await stub.download("m", 1))[1] == torchscript_bytes  # archived stays downloadable
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.SetAlias(pb.SetAliasRequest(model="m", alias="staging", version=3))
    )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="Prod!", version=2)),
    )


async def test_delete_model_removes_only_unshared_blobs(
    stub: TenantStub, other_stub: TenantStub, registry_settings: RegistrySettings, torchscript_bytes: bytes
) -> None:
    own, shared = make_onnx(0.1), torchscript_bytes
    await stub.create_model("m")
    await other_stub.create_model("m")
    await stub.upload("m", own, format=pb.ARTIFACT_FORMAT_ONNX)
    await stub.upload("m", shared)
    await other_stub.upload("m", shared)
    await stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=1))
    assert committed_blobs(registry_settings) == {sha256_of(own), sha256_of(shared)}
    await stub.DeleteModel(pb.DeleteModelRequest(name="m"))
    assert committed_blobs(registry_settings) == {sha256_of(shared)}
    assert (await other_stub.download("m", 1))[1] == shared
    await stub.create_model("m")
    assert (await stub.upload("m", own, format=pb.ARTIFACT_FORMAT_ONNX)).version == 1


async def test_concurrent_uploads_get_distinct_consecutive_numbers(stub: TenantStub) -> None:
    await stub.create_model("busy")
    artifacts = [make_onnx(i / 10) for i in range(6)] + [make_onnx(0.0)] * 2
    versions = await asyncio.gather(
        *(stub.upload("busy", a, format=pb.ARTIFACT_FORMAT_ONNX) for a in artifacts)
    )
    assert sorted(v.version for v in versions) == list(range(1, 9))
    for version in versions:
        assert (await stub.download("busy", version.version))[1] == artifacts[versions.index(version)]


# Bad uploads


async def assert_nothing_left(stub: TenantStub, settings: RegistrySettings, committed: set[str]) -> None:
    assert (await stub.ListVersions(pb.ListVersionsRequest(model="m"))).versions == []
    assert (await stub.GetModel(pb.GetModelRequest(name="m"))).model.latest_version == 0
    assert temp_files(settings) == []
    assert committed_blobs(settings) == committed
    assert len(blob_files(settings)) == len(committed)


async def test_upload_to_an_unknown_model(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.upload("nope", torchscript_bytes), "model 'nope' not found"
    )


async def test_upload_header_rules(stub: TenantStub, torchscript_bytes: bytes) -> None:
    await stub.create_model("m")
    chunk = pb.UploadVersionRequest(chunk=b"abc")
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UploadVersion(iter([chunk])),
        "the first message must be the header",
    )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stub.UploadVersion(iter([])), "the first message must be the header"
    )
    header, *chunks = upload_requests("m", torchscript_bytes)
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.UploadVersion(iter([header, chunks[0], header])),  # nothing after it: see test_registry_wire
        "header",
    )


@pytest.mark.parametrize(
    ("options", "code", "message"),
    [
        ({"format": pb.ARTIFACT_FORMAT_UNSPECIFIED}, grpc.StatusCode.INVALID_ARGUMENT, "format is required"),
        ({"signature": common_pb2.Signature()}, grpc.StatusCode.INVALID_ARGUMENT, "at least one input"),
        (
            {
                "signature": common_pb2.Signature(
                    inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[0])],
                    outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32)],
                )
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "dims are positive",
        ),
        ({"sha256": "ABC"}, grpc.StatusCode.INVALID_ARGUMENT, "64 lower-case hex"),
        ({"sha256": "F" * 64}, grpc.StatusCode.INVALID_ARGUMENT, "64 lower-case hex"),
        ({"size_bytes": 0}, grpc.StatusCode.INVALID_ARGUMENT, "at least 1"),
        ({"size_bytes": 5 * 1024**3}, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
        ({"metrics": {"loss": float("nan")}}, grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        ({"lineage": pb.Lineage(parent_version=-1)}, grpc.StatusCode.INVALID_ARGUMENT, "negative"),
    ],
)
async def test_bad_headers_are_refused(
    stub: TenantStub, registry_settings: RegistrySettings, torchscript_bytes: bytes, options, code, message
) -> None:
    await stub.create_model("m")
    await expect_status(code, stub.upload("m", torchscript_bytes, **options), message)
    await assert_nothing_left(stub, registry_settings, set())


async def test_sha256_mismatch_is_data_loss(
    stub: TenantStub, registry_settings: RegistrySettings, torchscript_bytes: bytes
) -> None:
    await stub.create_model("m")
    await expect_status(
        grpc.StatusCode.DATA_LOSS, stub.upload("m", torchscript_bytes, sha256="0" * 64), "sha256 mismatch"
    )
    await assert_nothing_left(stub, registry_settings, set())


async def test_cut_and_overlong_uploads_are_data_loss(
    stub: TenantStub, registry_settings: RegistrySettings, torchscript_bytes: bytes, onnx_bytes: bytes
) -> None:
    await stub.create_model("other")
    await stub.upload("other", onnx_bytes, format=pb.ARTIFACT_FORMAT_ONNX)
    await stub.create_model("m")
    full = torchscript_bytes
    cut = upload_requests("m", full[: len(full) // 2], sha256=sha256_of(full), size_bytes=len(full))
    await expect_status(grpc.StatusCode.DATA_LOSS, stub.UploadVersion(cut), f"of the {len(full)} bytes")
    long = upload_requests("m", full + b"extra", sha256=sha256_of(full), size_bytes=len(full))
    await expect_status(grpc.StatusCode.DATA_LOSS, stub.UploadVersion(long), "more than")
    await assert_nothing_left(stub, registry_settings, {sha256_of(onnx_bytes)})


async def test_client_cancelling_mid_upload_leaves_no_temp_file(
    stub: TenantStub, registry_settings: RegistrySettings
) -> None:
    await stub.create_model("m")
    data = b"\0" * (1024 * 1024)
    messages = upload_requests("m", data)

    async def stalls_halfway():
        for _ in range(4):
            yield next(messages)
        await asyncio.Event().wait()

    call = stub.UploadVersion(stalls_halfway())
    await wait_until(lambda: temp_files(registry_settings), timeout=5)
    call.cancel()
    await wait_until(lambda: not temp_files(registry_settings), timeout=1)
    await assert_nothing_left(stub, registry_settings, set())


async def test_pickles_are_refused(
    stub: TenantStub, registry_settings: RegistrySettings, torchscript_bytes: bytes
) -> None:
    import torch

    checkpoint = io.BytesIO()
    torch.save(torch.nn.Linear(4, 2), checkpoint)
    await stub.create_model("m")
    for artifact in [pickle.dumps({"weights": [1.0, 2.0]}), checkpoint.getvalue()]:
        await expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, stub.upload("m", artifact), "pickled artifacts are refused"
        )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.upload("m", torchscript_bytes, format=pb.ARTIFACT_FORMAT_ONNX),
        "not a valid single-file ONNX model",
    )
    await assert_nothing_left(stub, registry_settings, set())


async def test_oversize_messages_are_resource_exhausted(tmp_path, torchscript_bytes: bytes) -> None:
    settings = RegistrySettings(
        home=tmp_path,
        registry_addr="127.0.0.1:0",
        internal_token=TOKEN,
        max_message_bytes=256 * 1024,
        registry_chunk_bytes=64 * 1024,
    )
    async with running(await create_app(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = TenantStub(channel, "tenant-a")
            await stub.create_model("m")
            data = b"\1" * (512 * 1024)
            requests = upload_requests("m", data, chunk_bytes=len(data))
            await expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.UploadVersion(requests))
            await wait_until(lambda: not temp_files(settings))
            assert (await stub.upload("m", torchscript_bytes)).version == 1


# Tenancy and authentication


async def test_tenants_cannot_reach_each_other(
    stub: TenantStub, other_stub: TenantStub, torchscript_bytes: bytes
) -> None:
    await stub.create_model("secret")
    await stub.upload("secret", torchscript_bytes)
    await stub.CreateDataset(
        pb.CreateDatasetRequest(name="data", format=pb.DATASET_FORMAT_CSV, target_column="y")
    )
    not_found = grpc.StatusCode.NOT_FOUND
    await expect_status(not_found, other_stub.GetModel(pb.GetModelRequest(name="secret")))
    await expect_status(not_found, other_stub.GetVersion(pb.GetVersionRequest(model="secret", version=1)))
    await expect_status(not_found, other_stub.ListVersions(pb.ListVersionsRequest(model="secret")))
    await expect_status(not_found, other_stub.download("secret", 1))
    await expect_status(
        not_found, other_stub.SetAlias(pb.SetAliasRequest(model="secret", alias="mine", version=1))
    )
    await expect_status(
        not_found, other_stub.ArchiveVersion(pb.ArchiveVersionRequest(model="secret", version=1))
    )
    await expect_status(not_found, other_stub.DeleteModel(pb.DeleteModelRequest(name="secret")))
    await expect_status(not_found, other_stub.upload("secret", torchscript_bytes))
    await expect_status(not_found, other_stub.GetDataset(pb.GetDatasetRequest(name="data")))
    await expect_status(not_found, other_stub.DeleteDataset(pb.DeleteDatasetRequest(name="data")))
    assert (await stub.GetDataset(pb.GetDatasetRequest(name="data"))).dataset.target_column == "y"
    assert (await other_stub.ListModels(pb.ListModelsRequest())).models == []
    assert (await other_stub.ListDatasets(pb.ListDatasetsRequest())).datasets == []
    # The same name is free in the other tenant.
    assert (await other_stub.create_model("secret")).latest_version == 0
    assert (await stub.GetModel(pb.GetModelRequest(name="secret"))).model.latest_version == 1


async def test_callers_need_the_token_and_a_tenant(channel: grpc.aio.Channel) -> None:
    from maas.registry.v1 import registry_pb2_grpc

    raw = registry_pb2_grpc.RegistryServiceStub(channel)
    request = pb.ListModelsRequest()
    await expect_status(grpc.StatusCode.UNAUTHENTICATED, raw.ListModels(request), "internal token")
    await expect_status(
        grpc.StatusCode.UNAUTHENTICATED, TenantStub(channel, "tenant-a", token="wrong").ListModels(request)
    )
    await expect_status(
        grpc.StatusCode.UNAUTHENTICATED,
        raw.ListModels(request, metadata=(("x-maas-internal-token", TOKEN),)),
        "x-maas-tenant",
    )


# Datasets


def npz_bytes(rows: int = 4) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, X=np.zeros((rows, 3), dtype=np.float32), y=np.arange(rows))
    return buffer.getvalue()


async def test_dataset_lifecycle(stub: TenantStub) -> None:
    created = (
        await stub.CreateDataset(
            pb.CreateDatasetRequest(name="digits", description="d", format=pb.DATASET_FORMAT_NPZ)
        )
    ).dataset
    assert (created.name, created.format, created.latest_version) == ("digits", pb.DATASET_FORMAT_NPZ, 0)
    await stub.CreateDataset(
        pb.CreateDatasetRequest(name="houses", format=pb.DATASET_FORMAT_CSV, target_column="price")
    )
    assert (await stub.GetDataset(pb.GetDatasetRequest(name="houses"))).dataset.target_column == "price"
    first = await stub.ListDatasets(pb.ListDatasetsRequest(page_size=1))
    second = await stub.ListDatasets(pb.ListDatasetsRequest(page_size=1, page_token=first.next_page_token))
    assert [d.name for d in [*first.datasets, *second.datasets]] == ["digits", "houses"]

    arrays = [npz_bytes(4), npz_bytes(5)]
    for number, data in enumerate(arrays, start=1):
        version = (await stub.UploadDatasetVersion(dataset_requests("digits", data))).version
        assert (version.dataset, version.version, version.sha256) == ("digits", number, sha256_of(data))
    csv = b"rooms,price\n3,100\n4,150\n"
    assert (await stub.UploadDatasetVersion(dataset_requests("houses", csv))).version.version == 1

    listed = await stub.ListDatasetVersions(pb.ListDatasetVersionsRequest(dataset="digits"))
    assert [v.version for v in listed.versions] == [1, 2]
    responses = [
        r
        async for r in stub.DownloadDatasetVersion(
            pb.DownloadDatasetVersionRequest(dataset="digits", version=2)
        )
    ]
    assert responses[0].version.version == 2
    assert b"".join(r.chunk for r in responses[1:]) == arrays[1]
    assert (await stub.GetDataset(pb.GetDatasetRequest(name="digits"))).dataset.latest_version == 2


async def test_delete_dataset_takes_its_versions_and_only_unshared_bytes(
    stub: TenantStub, other_stub: TenantStub, registry_settings: RegistrySettings
) -> None:
    own, shared = npz_bytes(4), npz_bytes(6)
    for owner in (stub, other_stub):
        await owner.CreateDataset(pb.CreateDatasetRequest(name="rows", format=pb.DATASET_FORMAT_NPZ))
    await stub.UploadDatasetVersion(dataset_requests("rows", own))
    await stub.UploadDatasetVersion(dataset_requests("rows", shared))
    await other_stub.UploadDatasetVersion(dataset_requests("rows", shared))
    assert committed_blobs(registry_settings) == {sha256_of(own), sha256_of(shared)}

    await stub.DeleteDataset(pb.DeleteDatasetRequest(name="rows"))
    await expect_status(grpc.StatusCode.NOT_FOUND, stub.GetDataset(pb.GetDatasetRequest(name="rows")))
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        stub.DownloadDatasetVersion(pb.DownloadDatasetVersionRequest(dataset="rows", version=2)).read(),
    )
    # The other tenant's dataset of the same name, and the bytes it shares, stay whole.
    assert committed_blobs(registry_settings) == {sha256_of(shared)}
    responses = [
        r async for r in other_stub.DownloadDatasetVersion(pb.DownloadDatasetVersionRequest(dataset="rows", version=1))
    ]
    assert b"".join(r.chunk for r in responses[1:]) == shared
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.DeleteDataset(pb.DeleteDatasetRequest(name="rows")), "not found"
    )
    await expect_status(
        grpc.StatusCode.INVALID_ARGUMENT, stub.DeleteDataset(pb.DeleteDatasetRequest(name="../rows")), "dataset name"
    )
    # The name is free again; its versions number on from the deleted dataset's (2), so that
    # "rows@2" never names other bytes, and nothing is shown as a version before the first upload.
    await stub.CreateDataset(pb.CreateDatasetRequest(name="rows", format=pb.DATASET_FORMAT_NPZ))
    assert (await stub.GetDataset(pb.GetDatasetRequest(name="rows"))).dataset.latest_version == 0
    assert (await stub.UploadDatasetVersion(dataset_requests("rows", own))).version.version == 3
    assert (await stub.GetDataset(pb.GetDatasetRequest(name="rows"))).dataset.latest_version == 3
    # Deleted again with no upload in between, and created a third time: still on from 3; the
    # other tenant's dataset of the same name keeps its own numbers.
    await stub.DeleteDataset(pb.DeleteDatasetRequest(name="rows"))
    await stub.CreateDataset(pb.CreateDatasetRequest(name="rows", format=pb.DATASET_FORMAT_NPZ))
    await stub.DeleteDataset(pb.DeleteDatasetRequest(name="rows"))
    await stub.CreateDataset(pb.CreateDatasetRequest(name="rows", format=pb.DATASET_FORMAT_NPZ))
    assert (await stub.UploadDatasetVersion(dataset_requests("rows", shared))).version.version == 4
    assert (await other_stub.UploadDatasetVersion(dataset_requests("rows", own))).version.version == 2


async def test_bad_datasets_are_refused(stub: TenantStub, registry_settings: RegistrySettings) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_status(invalid, stub.CreateDataset(pb.CreateDatasetRequest(name="d")), "format is required")
    await expect_status(
        invalid,
        stub.CreateDataset(pb.CreateDatasetRequest(name="d", format=pb.DATASET_FORMAT_CSV)),
        "target_column",
    )
    await expect_status(
        invalid,
        stub.CreateDataset(pb.CreateDatasetRequest(name="D", format=pb.DATASET_FORMAT_NPZ)),
        "dataset name",
    )
    await stub.CreateDataset(
        pb.CreateDatasetRequest(name="tab", format=pb.DATASET_FORMAT_CSV, target_column="y")
    )
    await stub.CreateDataset(pb.CreateDatasetRequest(name="arr", format=pb.DATASET_FORMAT_NPZ))
    await expect_status(
        invalid, stub.UploadDatasetVersion(dataset_requests("tab", b"a,b\n1,2\n")), "'y' is missing"
    )
    await expect_status(
        invalid, stub.UploadDatasetVersion(dataset_requests("arr", pickle.dumps([1]))), ".npz"
    )
    await expect_status(
        grpc.StatusCode.DATA_LOSS,
        stub.UploadDatasetVersion(dataset_requests("tab", b"x,y\n", sha256="0" * 64)),
        "sha256 mismatch",
    )
    await expect_status(
        grpc.StatusCode.NOT_FOUND, stub.UploadDatasetVersion(dataset_requests("nope", b"x,y\n")), "not found"
    )
    await expect_status(
        invalid,
        stub.UploadDatasetVersion(iter([pb.UploadDatasetVersionRequest(chunk=b"x")])),
        "the first message must be the header",
    )
    await expect_status(
        grpc.StatusCode.NOT_FOUND,
        stub.DownloadDatasetVersion(pb.DownloadDatasetVersionRequest(dataset="tab", version=1)).read(),
    )
    assert temp_files(registry_settings) == [] and blob_files(registry_settings) == []
