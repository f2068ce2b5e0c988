"""gRPC face of the registry: protos in, domain calls, protos out. No logic of its own. The
upload and download streams' chunk messages are bytes on the wire (maas.wire)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.wire import chunk_tag, frame, unframe

from services.common.channels import caller_role_of, tenant_of
from services.common.errors import InvalidArgument
from services.registry.blobs import Chunk
from services.registry.service import Registry, VersionUpload
from services.registry.storage_usage import StorageMeter
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

SERVICE = "maas.registry.v1.RegistryService"
# The bulk streams' messages reach and leave the servicer as bytes (maas.wire):
# requests of the uploads, responses of the downloads.
BYTES_ON_THE_WIRE = {
    "UploadVersion": {"request_deserializer": None},
    "UploadDatasetVersion": {"request_deserializer": None},
    "DownloadVersion": {"response_serializer": None},
    "DownloadDatasetVersion": {"response_serializer": None},
}
DOWNLOAD_CHUNK_TAG = chunk_tag(registry_pb2.DownloadVersionResponse)
DATASET_DOWNLOAD_CHUNK_TAG = chunk_tag(registry_pb2.DownloadDatasetVersionResponse)

ARTIFACT_FORMATS = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: ArtifactFormat.TORCHSCRIPT,
    registry_pb2.ARTIFACT_FORMAT_ONNX: ArtifactFormat.ONNX,
    registry_pb2.ARTIFACT_FORMAT_SAFETENSORS: ArtifactFormat.SAFETENSORS,
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
    def __init__(self, registry: Registry, storage: StorageMeter) -> None:
        self.registry = registry
        self.storage = storage

    async def CreateModel(self, request, context):  # noqa: N802
        model = await self.registry.create_model(
            tenant_of(context), request.name, request.description, dict(request.labels), request.no_download
        )
        return registry_pb2.CreateModelResponse(model=model_pb(model))

    async def UpdateModel(self, request, context):  # noqa: N802
        model = await self.registry.update_model(
            tenant_of(context),
            request.model.name,
            request.update_mask.paths,
            description=request.model.description,
            labels=dict(request.model.labels),
            no_download=request.model.no_download,
            role=caller_role_of(context),
        )
        return registry_pb2.UpdateModelResponse(model=model_pb(model))

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
        requests = _Uploads(request_iterator, registry_pb2.UploadVersionRequest, "UploadVersion")
        header = (await requests.first_header()).header
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
            from_tenant_key=caller_role_of(context) is not None,
        )
        version = await self.registry.upload_version(tenant, upload, requests.chunks())
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

    async def UpdateVersionMetadata(self, request, context):  # noqa: N802
        version = await self.registry.update_version_metadata(
            tenant_of(context), request.model, request.version, dict(request.metadata)
        )
        return registry_pb2.UpdateVersionMetadataResponse(version=version_pb(version))

    async def DownloadVersion(self, request, context):  # noqa: N802
        version, chunks = await self.registry.download_version(
            tenant_of(context), request.model, request.version, caller_role_of(context)
        )
        async with contextlib.aclosing(chunks):
            yield registry_pb2.DownloadVersionResponse(version=version_pb(version)).SerializeToString()
            async for chunk in chunks:
                yield frame(DOWNLOAD_CHUNK_TAG, chunk)

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

    async def DeleteDataset(self, request, context):  # noqa: N802
        await self.registry.delete_dataset(tenant_of(context), request.name)
        return registry_pb2.DeleteDatasetResponse()

    async def ListDatasets(self, request, context):  # noqa: N802
        datasets, token = await self.registry.list_datasets(
            tenant_of(context), request.page_size, request.page_token
        )
        return registry_pb2.ListDatasetsResponse(
            datasets=[dataset_pb(d) for d in datasets], next_page_token=token
        )

    async def UploadDatasetVersion(self, request_iterator, context):  # noqa: N802
        tenant = tenant_of(context)
        requests = _Uploads(request_iterator, registry_pb2.UploadDatasetVersionRequest, "UploadDatasetVersion")
        header = (await requests.first_header()).header
        version = await self.registry.upload_dataset_version(
            tenant, header.dataset, header.sha256, header.size_bytes, requests.chunks()
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
            tenant_of(context), request.dataset, request.version, caller_role_of(context)
        )
        async with contextlib.aclosing(chunks):
            yield registry_pb2.DownloadDatasetVersionResponse(version=dataset_version_pb(version)).SerializeToString()
            async for chunk in chunks:
                yield frame(DATASET_DOWNLOAD_CHUNK_TAG, chunk)

    async def RotateKek(self, request, context):  # noqa: N802
        rotation = await self.registry.rotate_kek()
        return registry_pb2.RotateKekResponse(
            rewrapped_keys=rotation.rewrapped, kek_id=rotation.kek_id, previous_kek_id=rotation.previous_kek_id
        )

    async def GetStorageUsage(self, request, context):  # noqa: N802
        """Internal: the gateway's billing asks for the tenant it bills."""
        days = await self.storage.usage(tenant_of(context), request.start_day, request.end_day)
        return registry_pb2.GetStorageUsageResponse(
            days=[registry_pb2.StorageUsageDay(day=day.day, bytes=day.bytes) for day in days]
        )


def add_to_server(servicer: RegistryServicer, server: Any) -> None:
    """The generated mount, with the bulk streams' messages as bytes (BYTES_ON_THE_WIRE)."""
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, _BytesMount(server))


class _BytesMount:
    """Stands in for the server while the generated code mounts the service: the same method
    handlers, the bulk streams' taking or giving bytes."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        """Made again from the method handlers, which the generated code adds next."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        handlers = {method: _as_bytes(method, handler) for method, handler in handlers.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)


def _as_bytes(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    changes = BYTES_ON_THE_WIRE.get(method)
    # The generated handlers are named tuples (grpc's RpcMethodHandler implementation).
    return handler._replace(**changes) if changes else handler  # type: ignore[attr-defined]


class _Uploads:
    """An upload stream's messages as they arrived: the header, then chunks."""

    def __init__(self, requests: AsyncIterator[bytes], message_class: type[Upload], method: str) -> None:
        self.requests = aiter(requests)
        self.message_class = message_class
        self.method = f"/{SERVICE}/{method}"
        self.tag = chunk_tag(message_class)

    async def first_header(self) -> Upload:
        """The first message, which must carry the header."""
        raw = await anext(self.requests, None)
        first = None if raw is None else self._parse(raw)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message must be the header")
        return first

    async def chunks(self) -> AsyncIterator[Chunk]:
        async for raw in self.requests:
            chunk = unframe(self.tag, raw)
            if chunk is None:
                request = self._parse(raw)
                if request.WhichOneof("part") != "chunk":
                    raise InvalidArgument(
                        "only the first message may carry the header; every later one carries a chunk"
                    )
                chunk = request.chunk
            yield chunk

    def _parse(self, raw: bytes) -> Upload:
        try:
            return self.message_class.FromString(raw)
        except (DecodeError, ValueError) as error:
            # What the server's interceptor says of any other method's undecodable request.
            raise InvalidArgument(f"the request is not a valid protobuf message for {self.method}: {error}") from None


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
        no_download=model.no_download,
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
