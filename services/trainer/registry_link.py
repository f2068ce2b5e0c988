"""The trainer's calls to the registry, each on behalf of the job's tenant: fetch a dataset
version, check a parent version, fetch a version to optimize, and register a finished job's
artifact as a new version. What an optimization of a no-download model registers is
no-download too: a model this link creates for it is marked so, and a target model that allows
downloads is refused."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc

from services.common.channels import internal_metadata
from services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from services.common.remote_errors import domain_error
from services.common.tensors import BY_PROTO, BY_TRITON
from services.trainer.optimization_spec import SourceVersion
from services.trainer.retrain import VersionInfo

CHUNK_BYTES = 1024 * 1024
LIST_PAGE_SIZE = 500
DATASET_FORMATS = {registry_pb2.DATASET_FORMAT_NPZ: "NPZ", registry_pb2.DATASET_FORMAT_CSV: "CSV"}


@dataclass(frozen=True)
class FetchedDataset:
    version: int
    format: str  # NPZ or CSV
    target_column: str
    path: Path


@dataclass(frozen=True)
class Registration:
    model: str
    artifact: Path
    signature: dict[str, list[dict[str, Any]]]  # {"inputs": [{name, datatype, shape}], "outputs": [...]}
    metrics: dict[str, float]
    metadata: dict[str, str]
    job_id: str
    dataset: str  # a registry dataset; "" for built-in data (named in the metadata instead)
    dataset_version: int
    parent_version: int
    hyperparameters: dict[str, str]
    format: str = "TORCHSCRIPT"  # or ONNX
    precision: str = "fp32"
    # The model an optimization's artifact was made from ("" for training), and whether it was
    # marked no-download when the job was created (it is read again at registration).
    source: str = ""
    source_no_download: bool = False


class RegistryLink:
    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._token = token

    def _metadata(self, tenant: str) -> tuple[tuple[str, str], ...]:
        return internal_metadata(self._token, tenant)

    async def fetch_dataset(self, tenant: str, name: str, version: int, folder: Path) -> FetchedDataset:
        """Download a dataset version of the tenant (0: the newest) into `folder`."""
        meta = self._metadata(tenant)
        try:
            dataset = (await self._stub.GetDataset(registry_pb2.GetDatasetRequest(name=name), metadata=meta)).dataset
            if version == 0:
                version = dataset.latest_version
                if version == 0:
                    raise FailedPrecondition(f"dataset {name!r} has no versions yet: upload one first")
            format = DATASET_FORMATS[dataset.format]
            path = folder / f"dataset.{format.lower()}"
            partial = path.with_suffix(".partial")
            digest, expected = hashlib.sha256(), ""
            request = registry_pb2.DownloadDatasetVersionRequest(dataset=name, version=version)
            with partial.open("wb") as file:
                async for part in self._stub.DownloadDatasetVersion(request, metadata=meta):
                    if part.HasField("version"):
                        expected = part.version.sha256
                    else:
                        digest.update(part.chunk)
                        await asyncio.to_thread(file.write, part.chunk)
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None
        if digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise FailedPrecondition(f"dataset {name!r} version {version} arrived damaged (sha256 mismatch)")
        partial.replace(path)
        return FetchedDataset(version, format, dataset.target_column, path)

    async def no_download(self, tenant: str, model: str) -> bool:
        """Whether the tenant's model is marked no-download (False when there is no such model)."""
        found = await self._find_model(tenant, model)
        return found is not None and found.no_download

    async def check_no_download_target(self, tenant: str, target: str, source: str) -> None:
        """Refuse `target` as the model to hold what an optimization of the no-download model
        `source` makes, when it exists and allows downloads (a missing one is created marked)."""
        found = await self._find_model(tenant, target)
        if found is not None and not found.no_download:
            raise _downloadable_target(target, source)

    async def _find_model(self, tenant: str, model: str) -> registry_pb2.Model | None:
        request = registry_pb2.GetModelRequest(name=model)
        try:
            return (await self._stub.GetModel(request, metadata=self._metadata(tenant))).model
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise domain_error("registry", error) from None

    async def check_version(self, tenant: str, model: str, version: int) -> None:
        request = registry_pb2.GetVersionRequest(model=model, version=version)
        try:
            await self._stub.GetVersion(request, metadata=self._metadata(tenant))
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None

    # What retraining asks of the registry (services/trainer/retrain.py: RetrainRegistry)

    async def get_version(self, tenant: str, model: str, version: int) -> VersionInfo:
        request = registry_pb2.GetVersionRequest(model=model, version=version)
        try:
            found = (await self._stub.GetVersion(request, metadata=self._metadata(tenant))).version
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None
        return _version_info(found)

    async def list_versions(self, tenant: str, model: str) -> list[VersionInfo]:
        """Every version of the model, oldest first."""
        versions: list[VersionInfo] = []
        token = ""
        try:
            while True:
                request = registry_pb2.ListVersionsRequest(model=model, page_size=LIST_PAGE_SIZE, page_token=token)
                page = await self._stub.ListVersions(request, metadata=self._metadata(tenant))
                versions += [_version_info(v) for v in page.versions]
                token = page.next_page_token
                if not token:
                    return versions
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None

    async def alias_version(self, tenant: str, model: str, alias: str) -> int | None:
        """The version `alias` names, or None when the model has no such alias."""
        request = registry_pb2.GetVersionRequest(model=model, alias=alias)
        try:
            return (await self._stub.GetVersion(request, metadata=self._metadata(tenant))).version.version
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND and "alias" in (error.details() or ""):
                return None
            raise domain_error("registry", error) from None

    async def latest_dataset_version(self, tenant: str, dataset: str) -> int:
        """The dataset's newest version number (0: none uploaded yet)."""
        request = registry_pb2.GetDatasetRequest(name=dataset)
        try:
            return (await self._stub.GetDataset(request, metadata=self._metadata(tenant))).dataset.latest_version
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None

    async def update_version_metadata(self, tenant: str, model: str, version: int, entries: dict[str, str]) -> None:
        request = registry_pb2.UpdateVersionMetadataRequest(model=model, version=version, metadata=entries)
        try:
            await self._stub.UpdateVersionMetadata(request, metadata=self._metadata(tenant))
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None

    async def set_alias(self, tenant: str, model: str, alias: str, version: int) -> None:
        request = registry_pb2.SetAliasRequest(model=model, alias=alias, version=version)
        try:
            await self._stub.SetAlias(request, metadata=self._metadata(tenant))
        except grpc.aio.AioRpcError as error:
            raise domain_error("registry", error) from None

    async def fetch_version(self, tenant: str, model: str, version: int, path: Path) -> SourceVersion:
        """Download a model version's artifact to `path`, checking its sha256; returns its description."""
        request = registry_pb2.DownloadVersionRequest(model=model, version=version)
        partial = path.with_suffix(".partial")
        digest, described = hashlib.sha256(), None
        try:
            with partial.open("wb") as file:
                async for part in self._stub.DownloadVersion(request, metadata=self._metadata(tenant)):
                    if part.HasField("version"):
                        described = part.version
                    else:
                        digest.update(part.chunk)
                        await asyncio.to_thread(file.write, part.chunk)
        except grpc.aio.AioRpcError as error:
            partial.unlink(missing_ok=True)
            raise domain_error("registry", error) from None
        if described is None or digest.hexdigest() != described.sha256:
            partial.unlink(missing_ok=True)
            raise FailedPrecondition(f"{model} version {version} arrived damaged (sha256 mismatch)")
        partial.replace(path)
        format = registry_pb2.ArtifactFormat.Name(described.format).removeprefix("ARTIFACT_FORMAT_")
        return SourceVersion(model, version, format, described.precision, dict(described.metadata),
                             described.lineage.dataset_version, signature_dict(described.signature))

    async def register(self, tenant: str, registration: Registration) -> int:
        """Upload the artifact as a new version of the model (created if missing); returns the
        version number. A model this call created is deleted again if the upload fails."""
        meta = self._metadata(tenant)
        created = False
        no_download = registration.source_no_download or (
            bool(registration.source) and await self.no_download(tenant, registration.source)
        )
        try:
            try:
                model = await self._stub.GetModel(registry_pb2.GetModelRequest(name=registration.model), metadata=meta)
                if no_download and not model.model.no_download:
                    raise _downloadable_target(registration.model, registration.source)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                created = await self._create_model(tenant, registration.model, registration.job_id, no_download)
            response = await self._stub.UploadVersion(self._upload(registration), metadata=meta)
            return response.version.version
        except grpc.aio.AioRpcError as error:
            if created:
                await self._delete_model(tenant, registration.model)
            raise domain_error("registry", error) from None

    async def _create_model(self, tenant: str, model: str, job_id: str, no_download: bool) -> bool:
        request = registry_pb2.CreateModelRequest(
            name=model, description=f"created by trainer job {job_id}", no_download=no_download
        )
        try:
            await self._stub.CreateModel(request, metadata=self._metadata(tenant))
            return True
        except grpc.aio.AioRpcError as error:
            if domain_error("registry", error).__class__ is AlreadyExists:
                return False  # another job registered it meanwhile
            raise

    async def _delete_model(self, tenant: str, model: str) -> None:
        try:
            await self._stub.DeleteModel(registry_pb2.DeleteModelRequest(name=model), metadata=self._metadata(tenant))
        except grpc.aio.AioRpcError as error:
            if domain_error("registry", error).__class__ is not NotFound:
                raise

    async def _upload(self, registration: Registration) -> AsyncIterator[registry_pb2.UploadVersionRequest]:
        data = await asyncio.to_thread(registration.artifact.read_bytes)
        header = registry_pb2.VersionHeader(
            model=registration.model,
            format=registry_pb2.ArtifactFormat.Value(f"ARTIFACT_FORMAT_{registration.format}"),
            signature=signature_pb(registration.signature),
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            metrics=registration.metrics,
            metadata=registration.metadata,
            lineage=registry_pb2.Lineage(
                job_id=registration.job_id,
                dataset=registration.dataset,
                dataset_version=registration.dataset_version,
                parent_version=registration.parent_version,
                hyperparameters=registration.hyperparameters,
            ),
            precision=registration.precision,
        )
        yield registry_pb2.UploadVersionRequest(header=header)
        for start in range(0, len(data), CHUNK_BYTES):
            yield registry_pb2.UploadVersionRequest(chunk=data[start : start + CHUNK_BYTES])


def _version_info(version: registry_pb2.Version) -> VersionInfo:
    return VersionInfo(version.version, version.state == registry_pb2.VERSION_STATE_READY, dict(version.metadata))


def _downloadable_target(target: str, source: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"model {source!r} is marked no-download, so every model its optimizations register into must "
        f"be too, and model {target!r} allows downloads: register into a new model (created "
        f"no-download) or into {source!r}, or mark {target!r} (maas models update {target} --no-download)"
    )


def signature_dict(signature: common_pb2.Signature) -> dict[str, list[dict[str, Any]]]:
    """The inverse of signature_pb: {"inputs": [{name, datatype, shape}], "outputs": [...]}."""
    def specs(items: Any) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": BY_PROTO[s.datatype].triton, "shape": list(s.shape)} for s in items]

    return {"inputs": specs(signature.inputs), "outputs": specs(signature.outputs)}


def signature_pb(signature: dict[str, list[dict[str, Any]]]) -> common_pb2.Signature:
    def specs(items: list[dict[str, Any]]) -> list[common_pb2.TensorSpec]:
        return [
            common_pb2.TensorSpec(name=s["name"], datatype=BY_TRITON[s["datatype"]].proto, shape=s["shape"])
            for s in items
        ]

    return common_pb2.Signature(inputs=specs(signature["inputs"]), outputs=specs(signature["outputs"]))

