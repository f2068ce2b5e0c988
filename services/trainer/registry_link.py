"""The trainer's calls to the registry, each on behalf of the job's tenant: fetch a dataset
version, check a parent version, fetch a version to optimize, and register a finished job's
artifact as a new version."""

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
from services.common.tensors import BY_TRITON
from services.trainer.optimization_spec import SourceVersion

CHUNK_BYTES = 1024 * 1024
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

    async def check_version(self, tenant: str, model: str, version: int) -> None:
        request = registry_pb2.GetVersionRequest(model=model, version=version)
        try:
            await self._stub.GetVersion(request, metadata=self._metadata(tenant))
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
                             described.lineage.dataset_version)

    async def register(self, tenant: str, registration: Registration) -> int:
        """Upload the artifact as a new version of the model (created if missing); returns the
        version number. A model this call created is deleted again if the upload fails."""
        meta = self._metadata(tenant)
        created = False
        try:
            try:
                await self._stub.GetModel(registry_pb2.GetModelRequest(name=registration.model), metadata=meta)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                created = await self._create_model(tenant, registration)
            response = await self._stub.UploadVersion(self._upload(registration), metadata=meta)
            return response.version.version
        except grpc.aio.AioRpcError as error:
            if created:
                await self._delete_model(tenant, registration.model)
            raise domain_error("registry", error) from None

    async def _create_model(self, tenant: str, registration: Registration) -> bool:
        request = registry_pb2.CreateModelRequest(
            name=registration.model, description=f"created by trainer job {registration.job_id}"
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


def signature_pb(signature: dict[str, list[dict[str, Any]]]) -> common_pb2.Signature:
    def specs(items: list[dict[str, Any]]) -> list[common_pb2.TensorSpec]:
        return [
            common_pb2.TensorSpec(name=s["name"], datatype=BY_TRITON[s["datatype"]].proto, shape=s["shape"])
            for s in items
        ]

    return common_pb2.Signature(inputs=specs(signature["inputs"]), outputs=specs(signature["outputs"]))

