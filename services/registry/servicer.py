"""gRPC face of the registry: protos in, domain calls, protos out. No logic of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from google.protobuf.timestamp_pb2 import Timestamp
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.channels import tenant_of
from services.common.errors import InvalidArgument
from services.registry.service import Registry, VersionUpload
from services.registry.store import (
    ArtifactFormat,
    DatasetFormat,
    DatasetRecord,
    DatasetVersionRecord,
    Lineage,
    ModelRecord,
    VersionRecord,
    VersionState,
)

Upload = TypeVar("Upload", registry_pb2.UploadVersionRequest, registry_pb2.UploadDatasetVersionRequest)

ARTIFACT_FORMATS = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: ArtifactFormat.TORCHSCRIPT,
    registry_pb2.ARTIFACT_FORMAT_ONNX: ArtifactFormat.ONNX,
}
PROTO_ARTIFACT_FORMATS = {domain: proto for proto, domain in ARTIFACT_FORMATS.items()}
DATASET_FORMATS = {
    registry_pb2.DATASET_FORMAT_NPZ: DatasetFormat.NPZ,
    registry_pb2.DATASET_FORMAT_CSV: DatasetFormat.CSV,
}
PROTO_DATASET_FORMATS = {domain: proto for proto, domain in DATASET_FORMATS.items()}
PROTO_VERSION_STATES = {
    VersionState.READY: registry_pb2.VERSION_STATE_READY,
    VersionState.ARCHIVED: registry_pb2.VERSION_STATE_ARCHIVED,
}


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def CreateModel(self, request, context):  # noqa: N802
        model = await self.registry.create_model(
            tenant_of(context), request.name, request.description, dict(request.labels)
        )
        return registry_pb2.CreateModelResponse(model=model_pb(model))

    async def GetModel(self, request, context):  # noqa: N802
        model = await self.registry.get_model(tenant_of(context), request.name)
        return registry_pb2.GetModelResponse(model=model_pb(model))

    async def ListModels(self, request, context):  # noqa: N802
        models, token = await self.registry.list_models(
            tenant_of(context), request.page_size, request.page_token
        )
        return registry_pb2.ListModelsResponse(models=[model_pb(m) for m in models], next_page_token=token)

    async def DeleteModel(self, request, context):  # noqa: N802
        await self.registry.delete_model(tenant_of(context), request.name)
        return registry_pb2.DeleteModelResponse()

    async def UploadVersion(self, request_iterator, context):  # noqa: N802
        tenant = tenant_of(context)
        header = (await _first_header(request_iterator)).header
        upload = VersionUpload(
            model=header.model,
            format=ARTIFACT_FORMATS.get(header.format),
            signature=header.signature,
            sha256=header.sha256,
            size_bytes=header.size_bytes,
            metrics=dict(header.metrics),
            metadata=dict(header.metadata),
            lineage=lineage_of(header.lineage),
            precision=header.precision,
        )
        version = await self.registry.upload_version(tenant, upload, _chunks(request_iterator))
        return registry_pb2.UploadVersionResponse(version=version_pb(version))

    async def GetVersion(self, request, context):  # noqa: N802
        version = await self.registry.get_version(
            tenant_of(context),
            request.model,
            request.version if request.HasField("version") else None,
            request.alias,
        )
        return registry_pb2.GetVersionResponse(version=version_pb(version))

    async def ListVersions(self, request, context):  # noqa: N802
        versions, token = await self.registry.list_versions(
            tenant_of(context), request.model, request.page_size, request.page_token
        )
        return registry_pb2.ListVersionsResponse(
            versions=[version_pb(v) for v in versions], next_page_token=token
        )

    async def ArchiveVersion(self, request, context):  # noqa: N802
        version = await self.registry.archive_version(tenant_of(context), request.model, request.version)
        return registry_pb2.ArchiveVersionResponse(version=version_pb(version))

    async def DownloadVersion(self, request, context):  # noqa: N802
        version, chunks = await self.registry.download_version(
            tenant_of(context), request.model, request.version
        )
        async with contextlib.aclosing(chunks):
            yield registry_pb2.DownloadVersionResponse(version=version_pb(version))
            async for chunk in chunks:
                yield registry_pb2.DownloadVersionResponse(chunk=chunk)

    async def SetAlias(self, request, context):  # noqa: N802
        alias = await self.registry.set_alias(
            tenant_of(context), request.model, request.alias, request.version
        )
        return registry_pb2.SetAliasResponse(
            alias=registry_pb2.Alias(model=alias.model, name=alias.name, version=alias.version)
        )

    async def DeleteAlias(self, request, context):  # noqa: N802
        await self.registry.delete_alias(tenant_of(context), request.model, request.alias)
        return registry_pb2.DeleteAliasResponse()

    async def CreateDataset(self, request, context):  # noqa: N802
        dataset = await self.registry.create_dataset(
            tenant_of(context),
            request.name,
            request.description,
            DATASET_FORMATS.get(request.format),
            request.target_column,
        )
        return registry_pb2.CreateDatasetResponse(dataset=dataset_pb(dataset))

    async def GetDataset(self, request, context):  # noqa: N802
        dataset = await self.registry.get_dataset(tenant_of(context), request.name)
        return registry_pb2.GetDatasetResponse(dataset=dataset_pb(dataset))

    async def ListDatasets(self, request, context):  # noqa: N802
        datasets, token = await self.registry.list_datasets(
            tenant_of(context), request.page_size, request.page_token
        )
        return registry_pb2.ListDatasetsResponse(
            datasets=[dataset_pb(d) for d in datasets], next_page_token=token
        )

    async def UploadDatasetVersion(self, request_iterator, context):  # noqa: N802
        tenant = tenant_of(context)
        header = (await _first_header(request_iterator)).header
        version = await self.registry.upload_dataset_version(
            tenant, header.dataset, header.sha256, header.size_bytes, _chunks(request_iterator)
        )
        return registry_pb2.UploadDatasetVersionResponse(version=dataset_version_pb(version))

    async def ListDatasetVersions(self, request, context):  # noqa: N802
        versions, token = await self.registry.list_dataset_versions(
            tenant_of(context), request.dataset, request.page_size, request.page_token
        )
        return registry_pb2.ListDatasetVersionsResponse(
            versions=[dataset_version_pb(v) for v in versions], next_page_token=token
        )

    async def DownloadDatasetVersion(self, request, context):  # noqa: N802
        version, chunks = await self.registry.download_dataset_version(
            tenant_of(context), request.dataset, request.version
        )
        async with contextlib.aclosing(chunks):
            yield registry_pb2.DownloadDatasetVersionResponse(version=dataset_version_pb(version))
            async for chunk in chunks:
                yield registry_pb2.DownloadDatasetVersionResponse(chunk=chunk)


async def _first_header(requests: AsyncIterator[Upload]) -> Upload:
    """The first message of an upload stream, which must carry the header."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgument("the first message must be the header")
    return first


async def _chunks(requests: AsyncIterator[Upload]) -> AsyncIterator[bytes]:
    async for request in requests:
        if request.WhichOneof("part") != "chunk":
            raise InvalidArgument(
                "only the first message may carry the header; every later one carries a chunk"
            )
        yield request.chunk


def _timestamp(record: ModelRecord | VersionRecord | DatasetRecord | DatasetVersionRecord) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(record.create_time)
    return stamp


def lineage_of(lineage: registry_pb2.Lineage) -> Lineage:
    return Lineage(
        job_id=lineage.job_id,
        dataset=lineage.dataset,
        dataset_version=lineage.dataset_version,
        parent_version=lineage.parent_version,
        hyperparameters=dict(lineage.hyperparameters),
    )


def model_pb(model: ModelRecord) -> registry_pb2.Model:
    return registry_pb2.Model(
        name=model.name,
        description=model.description,
        labels=model.labels,
        latest_version=model.latest_version,
        aliases=model.aliases,
        create_time=_timestamp(model),
    )


def version_pb(version: VersionRecord) -> registry_pb2.Version:
    lineage = version.lineage
    return registry_pb2.Version(
        model=version.model,
        version=version.version,
        format=PROTO_ARTIFACT_FORMATS[version.format],
        signature=common_pb2.Signature.FromString(version.signature),
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        state=PROTO_VERSION_STATES[version.state],
        metrics=version.metrics,
        metadata=version.metadata,
        lineage=registry_pb2.Lineage(
            job_id=lineage.job_id,
            dataset=lineage.dataset,
            dataset_version=lineage.dataset_version,
            parent_version=lineage.parent_version,
            hyperparameters=lineage.hyperparameters,
        ),
        precision=version.precision,
        create_time=_timestamp(version),
    )


def dataset_pb(dataset: DatasetRecord) -> registry_pb2.Dataset:
    return registry_pb2.Dataset(
        name=dataset.name,
        description=dataset.description,
        format=PROTO_DATASET_FORMATS[dataset.format],
        target_column=dataset.target_column,
        latest_version=dataset.latest_version,
        create_time=_timestamp(dataset),
    )


def dataset_version_pb(version: DatasetVersionRecord) -> registry_pb2.DatasetVersion:
    return registry_pb2.DatasetVersion(
        dataset=version.dataset,
        version=version.version,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        create_time=_timestamp(version),
    )
