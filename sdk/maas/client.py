"""A small typed client for the MaaS gateway: deadlines, retries on UNAVAILABLE, numpy in and out.

    from maas import Client
    client = Client(api_key="maas_...")            # or MAAS_API_KEY / MAAS_GATEWAY_ADDR
    outputs = client.predict("digits", {"x": batch})  # {"logits": ndarray}
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import field_mask_pb2

from maas import wire
from maas.common.v1 import common_pb2
from maas.errors import AlreadyExists, ApiError, NotFound, from_rpc_error
from maas.gateway.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    monitoring_pb2,
    monitoring_pb2_grpc,
)
from maas.inference.v1 import inference_pb2, inference_pb2_grpc
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from maas.tensors import from_tensor, to_tensor
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
CHUNK_BYTES = 1024 * 1024
# Labels per Feedback call (the gateway takes at most 10,000).
FEEDBACK_BATCH = 10_000
T = TypeVar("T")

# gRPC's own retry machinery: transient UNAVAILABLE (a restarting service) is retried with backoff.
_RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

FORMATS = {
    "torchscript": registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    "onnx": registry_pb2.ARTIFACT_FORMAT_ONNX,
    "safetensors": registry_pb2.ARTIFACT_FORMAT_SAFETENSORS,  # a language model packed by maas.hf_format
}
# A dataset's format, which each of its versions has: the registry checks it at upload.
DATASET_FORMATS = {
    "csv": registry_pb2.DATASET_FORMAT_CSV,  # UTF-8, a header row; the dataset names its target column
    "npz": registry_pb2.DATASET_FORMAT_NPZ,  # numpy.savez arrays X and y
}
DEVICES = {"auto": inference_pb2.DEVICE_AUTO, "cpu": inference_pb2.DEVICE_CPU, "gpu": inference_pb2.DEVICE_GPU}
# A deployment in these states answers requests (scaled to zero: the first one loads a replica).
SERVING_STATES = (inference_pb2.DEPLOYMENT_STATE_READY, inference_pb2.DEPLOYMENT_STATE_SCALED_TO_ZERO)
ROLES = {"reader": admin_pb2.ROLE_READER, "developer": admin_pb2.ROLE_DEVELOPER, "admin": admin_pb2.ROLE_ADMIN}


# The key that starts the chunk field of UploadVersionRequest and DownloadVersionResponse.
_CHUNK_TAG = wire.chunk_tag(registry_pb2.UploadVersionRequest)
# The same for UploadDatasetVersionRequest and DownloadDatasetVersionResponse.
_DATASET_CHUNK_TAG = wire.chunk_tag(registry_pb2.UploadDatasetVersionRequest)
_REGISTRY = "/maas.registry.v1.RegistryService"


def dataset_format(name: str) -> int:
    """The DatasetFormat of "csv" or "npz" (any case)."""
    try:
        return DATASET_FORMATS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset format {name!r}; choose one of {', '.join(DATASET_FORMATS)}") from None


def _sha256_of(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _upload_stream(
    header: bytes, path: Path, chunk_tag: bytes, progress: Callable[[int], None] | None
) -> Iterator[bytes]:
    """An upload's messages: the header message, then the file in chunks sent as bytes (maas.wire)."""
    yield header
    block = memoryview(bytearray(CHUNK_BYTES))
    with path.open("rb") as file:
        while size := file.readinto(block):
            yield wire.frame(chunk_tag, block[:size])
            if progress:
                progress(size)


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None


class Client:
    """Synchronous client. One instance holds one channel; share it across threads."""

    def __init__(
        self,
        address: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        root_certificates: bytes | None = None,
    ) -> None:
        self.address = address or os.environ.get("MAAS_GATEWAY_ADDR", DEFAULT_ADDRESS)
        key = api_key or os.environ.get("MAAS_API_KEY", "")
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        options = [
            ("grpc.service_config", json.dumps(_RETRY_POLICY)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", 256 * 1024 * 1024),
            ("grpc.max_send_message_length", 256 * 1024 * 1024),
        ]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(self.address, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(self.address, options=options)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.billing = billing_pb2_grpc.BillingServiceStub(self.channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self.channel)
        self.monitoring = monitoring_pb2_grpc.MonitoringServiceStub(self.channel)
        # The artifact streams' chunk messages go as bytes (maas.wire).
        self._upload_version = self.channel.stream_unary(
            f"{_REGISTRY}/UploadVersion",
            response_deserializer=registry_pb2.UploadVersionResponse.FromString,
        )
        self._download_version = self.channel.unary_stream(
            f"{_REGISTRY}/DownloadVersion",
            request_serializer=registry_pb2.DownloadVersionRequest.SerializeToString,
        )
        self._upload_dataset_version = self.channel.stream_unary(
            f"{_REGISTRY}/UploadDatasetVersion",
            response_deserializer=registry_pb2.UploadDatasetVersionResponse.FromString,
        )
        self._download_dataset_version = self.channel.unary_stream(
            f"{_REGISTRY}/DownloadDatasetVersion",
            request_serializer=registry_pb2.DownloadDatasetVersionRequest.SerializeToString,
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        return _call(lambda: method(request, metadata=self._metadata, timeout=timeout or self.timeout))

    # --- admin -------------------------------------------------------------------------------
    def whoami(self) -> admin_pb2.ApiKey:
        return self._unary(self.admin.WhoAmI, admin_pb2.WhoAmIRequest()).api_key

    def create_tenant(self, name: str, display_name: str = "") -> admin_pb2.Tenant:
        request = admin_pb2.CreateTenantRequest(name=name, display_name=display_name)
        return self._unary(self.admin.CreateTenant, request).tenant

    def list_tenants(self) -> list[admin_pb2.Tenant]:
        return self._paged(lambda token: self._unary(
            self.admin.ListTenants, admin_pb2.ListTenantsRequest(page_token=token)), "tenants")

    def create_api_key(self, tenant: str, role: str = "developer", description: str = "") -> tuple[admin_pb2.ApiKey, str]:
        """Returns the key's record and its plaintext, which is never shown again."""
        request = admin_pb2.CreateApiKeyRequest(tenant=tenant, role=ROLES[role], description=description)
        response = self._unary(self.admin.CreateApiKey, request)
        return response.api_key, response.plaintext

    def list_api_keys(self, tenant: str) -> list[admin_pb2.ApiKey]:
        return self._paged(lambda token: self._unary(
            self.admin.ListApiKeys, admin_pb2.ListApiKeysRequest(tenant=tenant, page_token=token)), "api_keys")

    def revoke_api_key(self, key_id: str) -> admin_pb2.ApiKey:
        return self._unary(self.admin.RevokeApiKey, admin_pb2.RevokeApiKeyRequest(id=key_id)).api_key

    # --- registry ----------------------------------------------------------------------------
    def create_model(self, name: str, description: str = "", *, no_download: bool = False) -> registry_pb2.Model:
        """A new model; `no_download`: only an admin key may download its versions."""
        request = registry_pb2.CreateModelRequest(name=name, description=description, no_download=no_download)
        return self._unary(self.registry.CreateModel, request).model

    def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        no_download: bool | None = None,
    ) -> registry_pb2.Model:
        """Change what is given, leave the rest: update_model("digits", no_download=True) marks a
        model no-download (any developer); no_download=False lifts the mark (an admin key only)."""
        given = {"description": description, "labels": labels, "no_download": no_download}
        paths = [field for field, value in given.items() if value is not None]
        if not paths:
            raise ValueError("give at least one of description, labels and no_download to change")
        model = registry_pb2.Model(
            name=name, description=description or "", labels=dict(labels or {}), no_download=bool(no_download)
        )
        request = registry_pb2.UpdateModelRequest(model=model, update_mask=field_mask_pb2.FieldMask(paths=paths))
        return self._unary(self.registry.UpdateModel, request).model

    def get_model(self, name: str) -> registry_pb2.Model:
        return self._unary(self.registry.GetModel, registry_pb2.GetModelRequest(name=name)).model

    def list_models(self) -> list[registry_pb2.Model]:
        return self._paged(lambda token: self._unary(
            self.registry.ListModels, registry_pb2.ListModelsRequest(page_token=token)), "models")

    def delete_model(self, name: str) -> None:
        self._unary(self.registry.DeleteModel, registry_pb2.DeleteModelRequest(name=name))

    def delete_model_if_empty(self, name: str) -> bool:
        """Deletes `name` unless it has a version (another upload may have added one meanwhile),
        e.g. after the upload it was created for was refused. A failure leaves it and says False,
        since the refused upload is the error to report."""
        try:
            if self.list_versions(name):
                return False
            self.delete_model(name)
        except ApiError:
            return False
        return True

    def upload_version(
        self,
        model: str,
        artifact: str | Path,
        *,
        format: str,
        signature: common_pb2.Signature,
        metrics: Mapping[str, float] | None = None,
        metadata: Mapping[str, str] | None = None,
        precision: str = "fp32",
        progress: Callable[[int], None] | None = None,
        timeout: float | None = None,
    ) -> registry_pb2.Version:
        """Stream a TorchScript, ONNX or safetensors file to the registry; `progress` gets each chunk's size."""
        path = Path(artifact)
        header = registry_pb2.VersionHeader(
            model=model,
            format=FORMATS[format.lower()],
            signature=signature,
            sha256=_sha256_of(path),
            size_bytes=path.stat().st_size,
            metrics=dict(metrics or {}),
            metadata=dict(metadata or {}),
            precision=precision,
        )

        messages = _upload_stream(
            registry_pb2.UploadVersionRequest(header=header).SerializeToString(), path, _CHUNK_TAG, progress
        )
        response = _call(lambda: self._upload_version(
            messages, metadata=self._metadata, timeout=timeout or max(self.timeout, 600)))
        return response.version

    def import_hf(
        self,
        path: str | Path,
        *,
        model: str,
        alias: str = "",
        log: Callable[[str], None] = lambda _: None,
        progress: Callable[[int], None] | None = None,
    ) -> registry_pb2.Version:
        """Import a local Hugging Face model directory as a new version of `model` (created if
        missing): a GPT-2, Llama or Qwen2 language model as one safetensors file, a BERT encoder
        as an ONNX embedding model (maas.hf_import). Pickled weights are refused."""
        from maas.hf_import import import_hf

        return import_hf(self, path, model, alias=alias, log=log, progress=progress)

    def get_version(self, model: str, version: int | None = None, alias: str = "") -> registry_pb2.Version:
        request = registry_pb2.GetVersionRequest(model=model, alias=alias)
        if version is not None:
            request.version = version
        return self._unary(self.registry.GetVersion, request).version

    def list_versions(self, model: str) -> list[registry_pb2.Version]:
        return self._paged(lambda token: self._unary(
            self.registry.ListVersions, registry_pb2.ListVersionsRequest(model=model, page_token=token)), "versions")

    def set_alias(self, model: str, alias: str, version: int) -> registry_pb2.Alias:
        request = registry_pb2.SetAliasRequest(model=model, alias=alias, version=version)
        return self._unary(self.registry.SetAlias, request).alias

    def download_version(self, model: str, version: int, destination: str | Path) -> registry_pb2.Version:
        """Stream a version's artifact to `destination`; returns the version record."""
        request = registry_pb2.DownloadVersionRequest(model=model, version=version)
        target = Path(destination)
        partial = target.with_name(target.name + ".partial")
        record = None
        try:
            with partial.open("wb") as file:
                stream = self._download_version(request, metadata=self._metadata, timeout=max(self.timeout, 600))
                for message in stream:
                    chunk = wire.unframe(_CHUNK_TAG, message)
                    if chunk is None:
                        part = registry_pb2.DownloadVersionResponse.FromString(message)
                        if part.HasField("version"):
                            record = part.version
                            continue
                        chunk = part.chunk
                    file.write(chunk)
            partial.replace(target)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            partial.unlink(missing_ok=True)
        if record is None:
            raise RuntimeError("the download stream carried no version record")
        return record

    # --- datasets ------------------------------------------------------------------------------
    def create_dataset(
        self, name: str, description: str = "", *, format: str = "csv", target_column: str = ""
    ) -> registry_pb2.Dataset:
        """A new dataset; each of its versions is one file in its `format`: "csv" (UTF-8 with a header
        row; `target_column` names the column to predict, the other columns are numeric features) or
        "npz" (numpy.savez arrays X and y)."""
        request = registry_pb2.CreateDatasetRequest(
            name=name, description=description, format=dataset_format(format), target_column=target_column
        )
        return self._unary(self.registry.CreateDataset, request).dataset

    def get_dataset(self, name: str) -> registry_pb2.Dataset:
        return self._unary(self.registry.GetDataset, registry_pb2.GetDatasetRequest(name=name)).dataset

    def delete_dataset(self, name: str) -> None:
        """Deletes the dataset and all its versions. Training jobs and retraining policies that
        name it fail with NOT_FOUND from then on."""
        self._unary(self.registry.DeleteDataset, registry_pb2.DeleteDatasetRequest(name=name))

    def list_datasets(self) -> list[registry_pb2.Dataset]:
        return self._paged(lambda token: self._unary(
            self.registry.ListDatasets, registry_pb2.ListDatasetsRequest(page_token=token)), "datasets")

    def ensure_dataset(
        self, name: str, *, format: str, target_column: str = "", description: str = ""
    ) -> tuple[registry_pb2.Dataset, bool]:
        """The dataset `name`, and whether this call created it (with these settings) because it was
        missing. One that exists must have this format and, when one is given, this target column:
        every version of a dataset is read alike. A mismatch raises ValueError."""
        try:
            dataset = self.get_dataset(name)
        except NotFound:
            try:
                return self.create_dataset(name, description, format=format, target_column=target_column), True
            except AlreadyExists:  # another caller created it meanwhile
                dataset = self.get_dataset(name)
        if dataset.format != dataset_format(format) or (target_column and dataset.target_column != target_column):
            kept = registry_pb2.DatasetFormat.Name(dataset.format).removeprefix("DATASET_FORMAT_").lower()
            if dataset.target_column:
                kept += f" with target column {dataset.target_column!r}"
            asked = format.lower() + (f" with target column {target_column!r}" if target_column else "")
            raise ValueError(f"dataset {name!r} exists as {kept}, not {asked}; upload a file of that kind, "
                             "or use another dataset name")
        return dataset, False

    def upload_dataset_version(
        self,
        dataset: str,
        path: str | Path,
        *,
        format: str | None = None,
        target_column: str = "",
        progress: Callable[[int], None] | None = None,
        timeout: float | None = None,
    ) -> registry_pb2.DatasetVersion:
        """Stream a CSV or NPZ file to the registry as the next version of `dataset`; `progress` gets
        each chunk's size. The version exists only once the bytes match their sha256 and read as the
        dataset's format. With `format` (and for CSV `target_column`), a missing dataset is created
        first, and an existing one must agree (ensure_dataset)."""
        if format is not None:
            self.ensure_dataset(dataset, format=format, target_column=target_column)
        file_path = Path(path)
        header = registry_pb2.DatasetVersionHeader(
            dataset=dataset, sha256=_sha256_of(file_path), size_bytes=file_path.stat().st_size
        )
        messages = _upload_stream(
            registry_pb2.UploadDatasetVersionRequest(header=header).SerializeToString(), file_path,
            _DATASET_CHUNK_TAG, progress,
        )
        response = _call(lambda: self._upload_dataset_version(
            messages, metadata=self._metadata, timeout=timeout or max(self.timeout, 600)))
        return response.version

    def list_dataset_versions(self, dataset: str) -> list[registry_pb2.DatasetVersion]:
        return self._paged(lambda token: self._unary(
            self.registry.ListDatasetVersions,
            registry_pb2.ListDatasetVersionsRequest(dataset=dataset, page_token=token)), "versions")

    def download_dataset_version(
        self,
        dataset: str,
        version: int,
        destination: str | Path,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> registry_pb2.DatasetVersion:
        """Stream a dataset version's file to `destination`, which appears only whole and checked
        against the size and sha256 the registry recorded (else DATA_LOSS, and nothing is written);
        `progress` gets each chunk's size and the file's. Returns the version record."""
        request = registry_pb2.DownloadDatasetVersionRequest(dataset=dataset, version=version)
        target = Path(destination)
        # A name of its own: two downloads to one destination never write into each other's file.
        partial = target.with_name(f"{target.name}.{secrets.token_hex(4)}.partial")
        record, digest, received = None, hashlib.sha256(), 0
        try:
            with partial.open("xb") as file:
                stream = self._download_dataset_version(
                    request, metadata=self._metadata, timeout=max(self.timeout, 600))
                for message in stream:
                    chunk = wire.unframe(_DATASET_CHUNK_TAG, message)
                    if chunk is None:
                        part = registry_pb2.DownloadDatasetVersionResponse.FromString(message)
                        if part.HasField("version"):
                            record = part.version
                            continue
                        chunk = part.chunk
                    file.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    if progress:
                        progress(len(chunk), record.size_bytes if record else 0)
            if record is None:
                raise RuntimeError("the download stream carried no version record")
            if (received, digest.hexdigest()) != (record.size_bytes, record.sha256):
                raise ApiError(
                    grpc.StatusCode.DATA_LOSS,
                    f"version {version} of dataset {dataset!r} arrived as {received} bytes with sha256 "
                    f"{digest.hexdigest()}, but the registry recorded {record.size_bytes} bytes with sha256 "
                    f"{record.sha256}; {target} was not written",
                )
            partial.replace(target)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            partial.unlink(missing_ok=True)
        return record

    # --- deployments and prediction ---------------------------------------------------------
    def create_deployment(
        self,
        name: str,
        model: str,
        *,
        version: int | None = None,
        alias: str = "",
        instances: int = 1,
        max_batch_size: int = 8,
        device: str = "auto",
        cacheable: bool = False,
        execution_limit_seconds: int = 0,
        replicas: int | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        target_in_flight: int | None = None,
    ) -> inference_pb2.Deployment:
        """Deploy a model version (or follow an alias). `replicas` is a fixed count (min = max);
        or let the autoscaler keep it between `min_replicas` (0: scale to zero when idle) and
        `max_replicas`, aiming at `target_in_flight` requests per replica. Unset: the service's
        defaults (one replica)."""
        deployment = inference_pb2.Deployment(
            name=name, model=model, instances=instances, max_batch_size=max_batch_size,
            device=DEVICES[device], cacheable=cacheable, execution_limit_seconds=execution_limit_seconds,
            **replica_fields(replicas, min_replicas, max_replicas, target_in_flight),
        )
        if alias:
            deployment.alias = alias
        elif version is not None:
            deployment.version = version
        request = inference_pb2.CreateDeploymentRequest(deployment=deployment)
        return self._unary(self.inference.CreateDeployment, request).deployment

    def get_deployment(self, name: str) -> inference_pb2.Deployment:
        return self._unary(self.inference.GetDeployment, inference_pb2.GetDeploymentRequest(name=name)).deployment

    def list_deployments(self) -> list[inference_pb2.Deployment]:
        return self._paged(lambda token: self._unary(
            self.inference.ListDeployments, inference_pb2.ListDeploymentsRequest(page_token=token)), "deployments")

    def update_deployment(
        self,
        deployment: inference_pb2.Deployment | str,
        fields: Sequence[str] = (),
        *,
        replicas: int | None = None,
        min_replicas: int | None = None,
        max_replicas: int | None = None,
        target_in_flight: int | None = None,
    ) -> inference_pb2.Deployment:
        """Change the `fields` of a deployment (a message with the new values, or just its name)
        and the scaling fields given as keywords (see create_deployment), which join the mask:

            client.update_deployment("web", replicas=3)
            client.update_deployment("web", min_replicas=0, max_replicas=4, target_in_flight=8)
        """
        changed = inference_pb2.Deployment()  # a copy: the caller's message stays as it was
        if isinstance(deployment, str):
            changed.name = deployment
        else:
            changed.CopyFrom(deployment)
        scaling = replica_fields(replicas, min_replicas, max_replicas, target_in_flight)
        for field, value in scaling.items():
            setattr(changed, field, value)
        paths = [*fields, *(field for field in scaling if field not in fields)]
        request = inference_pb2.UpdateDeploymentRequest(
            deployment=changed, update_mask=field_mask_pb2.FieldMask(paths=paths))
        return self._unary(self.inference.UpdateDeployment, request).deployment

    def delete_deployment(self, name: str) -> None:
        self._unary(self.inference.DeleteDeployment, inference_pb2.DeleteDeploymentRequest(name=name))

    def wait_ready(self, name: str, timeout: float = 120.0, poll: float = 0.25) -> inference_pb2.Deployment:
        """Poll until the deployment is READY (or SCALED_TO_ZERO: it serves, its first request
        loads a replica); raises RuntimeError if it FAILED, TimeoutError if time runs out (a
        PENDING deployment's message says which capacity is short)."""
        deadline = time.monotonic() + timeout
        while True:
            deployment = self.get_deployment(name)
            if deployment.state in SERVING_STATES:
                return deployment
            if deployment.state == inference_pb2.DEPLOYMENT_STATE_FAILED:
                raise RuntimeError(f"deployment {name} failed: {deployment.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {name} not ready after {timeout:.0f}s: {deployment.message}")
            time.sleep(poll)

    def wait_canary_ready(self, name: str, timeout: float = 120.0, poll: float = 0.25) -> inference_pb2.Deployment:
        """Poll until the deployment's canary is READY and answering its share; raises RuntimeError
        if the canary failed or is gone (rolled back), TimeoutError if time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            deployment = self.get_deployment(name)
            if not deployment.HasField("canary"):
                raise RuntimeError(f"deployment {name} has no canary any more: {deployment.message}")
            if deployment.canary.state == inference_pb2.DEPLOYMENT_STATE_READY:
                return deployment
            if deployment.canary.state == inference_pb2.DEPLOYMENT_STATE_FAILED:
                raise RuntimeError(f"the canary of {name} failed: {deployment.canary.message or deployment.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the canary of {name} is not ready after {timeout:.0f}s: {deployment.canary.message or deployment.message}")
            time.sleep(poll)

    def predict(
        self, deployment: str, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None,
        timeout: float | None = None, *, request_id: str = "",
    ) -> dict[str, np.ndarray]:
        """`request_id` (sent as x-request-id) is what a logged prediction is found by: pass the
        same id to `feedback` with the true label."""
        request = inference_pb2.PredictRequest(
            deployment=deployment,
            inputs=[to_tensor(name, array) for name, array in inputs.items()],
            output_names=outputs or [],
        )
        metadata = (*self._metadata, ("x-request-id", request_id)) if request_id else self._metadata
        response = _call(lambda: self.inference.Predict(request, metadata=metadata, timeout=timeout or self.timeout))
        return {tensor.name: from_tensor(tensor) for tensor in response.outputs}

    def generate(
        self, deployment: str, prompt: str = "", *, messages: Sequence[Mapping[str, str]] = (),
        max_tokens: int | None = None, temperature: float | None = None, top_k: int = 0,
        top_p: float | None = None, seed: int | None = None, stop: Sequence[str] = (), timeout: float | None = None,
    ) -> Iterator[inference_pb2.GenerateResponse]:
        """Stream text from a text-generation deployment: messages with the text as it comes (one
        or more tokens each), the last one with finish_reason and the token counts. Stopping the
        iteration early (break, close()) cancels the call, and the model stops generating.

        Give a `prompt` to continue, or chat `messages` ({"role": ..., "content": ...}, as OpenAI's
        API takes them) that the model's own chat template turns into its prompt."""
        request = inference_pb2.GenerateRequest(
            deployment=deployment, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=list(stop),
            messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
        call = self.inference.Generate(request, metadata=self._metadata, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            call.cancel()

    def embed(self, deployment: str, texts: Sequence[str], timeout: float | None = None) -> np.ndarray:
        """Sentence embeddings from an embedding deployment: FP32 [len(texts), dimensions],
        L2-normalised rows in the order of `texts` (1 to 256 non-empty strings)."""
        request = inference_pb2.EmbedRequest(deployment=deployment, texts=list(texts))
        return from_tensor(self._unary(self.inference.Embed, request, timeout).embeddings)

    # --- prediction monitoring ---------------------------------------------------------------
    def set_prediction_logging(
        self, deployment: str, sample_rate: float, *, keep_payloads: bool = False, byte_budget_per_day: int = 0,
        retention_days: int = 0,
    ) -> monitoring_pb2.PredictionLogging:
        """Log `sample_rate` (0 to 1; 0 turns it off) of the deployment's predictions; 0 for the
        byte budget or the retention means the gateway's default."""
        wanted = monitoring_pb2.PredictionLogging(
            deployment=deployment, sample_rate=sample_rate, keep_payloads=keep_payloads,
            byte_budget_per_day=byte_budget_per_day, retention_days=retention_days,
        )
        request = monitoring_pb2.SetPredictionLoggingRequest(logging=wanted)
        return self._unary(self.monitoring.SetPredictionLogging, request).logging

    def get_prediction_logging(self, deployment: str) -> monitoring_pb2.PredictionLogging:
        request = monitoring_pb2.GetPredictionLoggingRequest(deployment=deployment)
        return self._unary(self.monitoring.GetPredictionLogging, request).logging

    def prediction_samples(self, deployment: str, limit: int = 0) -> list[monitoring_pb2.PredictionSample]:
        """The newest predictions logged with their payloads, newest first (limit 0: 20)."""
        request = monitoring_pb2.ListPredictionSamplesRequest(deployment=deployment, limit=limit)
        return list(self._unary(self.monitoring.ListPredictionSamples, request).samples)

    def drift(self, deployment: str) -> monitoring_pb2.GetDriftResponse:
        """The deployment's last window against its version's baseline, worst features first, and
        its live quality from feedback."""
        return self._unary(self.monitoring.GetDrift, monitoring_pb2.GetDriftRequest(deployment=deployment))

    def feedback(self, deployment: str, labels: Mapping[str, float]) -> monitoring_pb2.FeedbackResponse:
        """True labels (class indices, or regression targets) by the request id each prediction
        was served with; sent FEEDBACK_BATCH at a time, the answers added up."""
        answer = monitoring_pb2.FeedbackResponse()
        items = list(labels.items())
        for start in range(0, len(items), FEEDBACK_BATCH):
            request = monitoring_pb2.FeedbackRequest(
                deployment=deployment,
                labels=[monitoring_pb2.Label(request_id=k, value=v) for k, v in items[start : start + FEEDBACK_BATCH]],
            )
            part = self._unary(self.monitoring.Feedback, request)
            answer.matched += part.matched
            answer.unmatched_request_ids.extend(part.unmatched_request_ids)
        return answer

    # --- canaries and load -------------------------------------------------------------------
    def start_canary(
        self, name: str, version: int, weight_percent: int, max_error_rate: float = 0.0
    ) -> inference_pb2.Deployment:
        """Send `weight_percent` of the deployment's requests to `version`; with max_error_rate > 0
        the canary is rolled back by itself once its failed fraction passes it."""
        request = inference_pb2.StartCanaryRequest(
            name=name, version=version, weight_percent=weight_percent, max_error_rate=max_error_rate)
        return self._unary(self.inference.StartCanary, request).deployment

    def promote_canary(self, name: str) -> inference_pb2.Deployment:
        return self._unary(self.inference.PromoteCanary, inference_pb2.PromoteCanaryRequest(name=name)).deployment

    def rollback_canary(self, name: str) -> inference_pb2.Deployment:
        return self._unary(self.inference.RollbackCanary, inference_pb2.RollbackCanaryRequest(name=name)).deployment

    def get_deployment_load(self, name: str) -> inference_pb2.GetDeploymentLoadResponse:
        """What Triton holds and has done for each loaded version of the deployment."""
        return self._unary(self.inference.GetDeploymentLoad, inference_pb2.GetDeploymentLoadRequest(name=name))

    # --- the serving fleet (platform admin key) -----------------------------------------------
    def list_nodes(self) -> list[inference_pb2.Node]:
        """The Triton nodes replicas are placed on: state, capacity, what is free, last contact."""
        return list(self._unary(self.admin.ListNodes, admin_pb2.ListNodesRequest()).nodes)

    def drain_node(self, name: str) -> inference_pb2.Node:
        """Move the node's replicas to other nodes (each is ready elsewhere before it leaves),
        then keep the node out of placement until resume_node."""
        return self._unary(self.admin.DrainNode, admin_pb2.DrainNodeRequest(name=name)).node

    def resume_node(self, name: str) -> inference_pb2.Node:
        """Put a drained node back into placement."""
        return self._unary(self.admin.ResumeNode, admin_pb2.ResumeNodeRequest(name=name)).node

    # --- encryption at rest (platform admin key) ------------------------------------------------
    def rotate_kek(self) -> admin_pb2.RotateKekResponse:
        """A new key-encryption key for the registry: every blob's data key is re-wrapped with it
        (no blob is re-encrypted) and it replaces the KEK file. Keep the previous KEK as long as
        backups taken before are kept: they need it to be restored."""
        return self._unary(self.admin.RotateKek, admin_pb2.RotateKekRequest(), max(self.timeout, 600))

    # --- helpers ------------------------------------------------------------------------------
    def _paged(self, fetch: Callable[[str], Any], field: str) -> list[Any]:
        items: list[Any] = []
        token = ""
        while True:
            page = fetch(token)
            items.extend(getattr(page, field))
            token = page.next_page_token
            if not token:
                return items


    # --- quotas, usage, audit -----------------------------------------------------------------
    def set_quota(self, quota: admin_pb2.Quota, fields: Sequence[str] = ()) -> admin_pb2.Quota:
        """Replace a tenant's quota and tenant-wide rate limit (zero fields mean unlimited), or
        change only the `fields` named (update-mask paths), keeping the others; returns the result:

            client.set_quota(admin_pb2.Quota(tenant="acme", requests_per_day=100_000))  # rest unlimited
            client.set_quota(admin_pb2.Quota(tenant="acme", requests_per_day=100_000), ["requests_per_day"])
            client.set_quota(admin_pb2.Quota(tenant="acme"), ["rate_limit"])  # clears the rate limit
        """
        request = admin_pb2.SetQuotaRequest(quota=quota, update_mask=field_mask_pb2.FieldMask(paths=fields))
        return self._unary(self.admin.SetQuota, request).quota

    def get_quota(self, tenant: str) -> admin_pb2.Quota:
        return self._unary(self.admin.GetQuota, admin_pb2.GetQuotaRequest(tenant=tenant)).quota

    def set_api_key_rate_limit(
        self, key_id: str, requests_per_second: float | None, burst: int = 0, tokens_per_minute: int = 0
    ) -> admin_pb2.ApiKey:
        """A key's own limit; requests_per_second=None clears it (the gateway default applies)."""
        request = admin_pb2.SetApiKeyRateLimitRequest(id=key_id)
        if requests_per_second is not None:
            request.rate_limit.CopyFrom(
                admin_pb2.RateLimit(
                    requests_per_second=requests_per_second, burst=burst, tokens_per_minute=tokens_per_minute
                )
            )
        return self._unary(self.admin.SetApiKeyRateLimit, request).api_key

    def get_usage(
        self, tenant: str = "", api_key_id: str = "", start_day: str = "", end_day: str = ""
    ) -> list[admin_pb2.UsageRow]:
        """Usage by UTC day (YYYY-MM-DD range, default the last 7 days) of a tenant or one key."""
        request = admin_pb2.GetUsageRequest(
            tenant=tenant, api_key_id=api_key_id, start_day=start_day, end_day=end_day
        )
        return list(self._unary(self.admin.GetUsage, request).rows)

    def list_audit_events(
        self, tenant: str = "", api_key_id: str = "", method: str = "", limit: int = 100
    ) -> list[admin_pb2.AuditEvent]:
        """The newest audit events matching the filters, at most `limit` of them."""
        events: list[admin_pb2.AuditEvent] = []
        token = ""
        while len(events) < limit:
            request = admin_pb2.ListAuditEventsRequest(
                tenant=tenant,
                api_key_id=api_key_id,
                method=method,
                page_size=min(limit - len(events), 1000),
                page_token=token,
            )
            page = self._unary(self.admin.ListAuditEvents, request)
            events.extend(page.audit_events)
            token = page.next_page_token
            if not token:
                break
        return events

    # --- billing: amounts are decimal strings (or Decimal), never floats -----------------------
    def set_price(
        self, resource: str, amount: str | Decimal, *, tier: str = "", effective_day: str = ""
    ) -> billing_pb2.Price:
        """The price of `resource` (per 1000 requests or tokens, CPU- or GPU-second, GB-month,
        replica-hour) from `effective_day` (YYYY-MM-DD, default today, UTC) on; `tier` empty:
        every tier without a price of its own. Platform admin key."""
        request = billing_pb2.SetPriceRequest(
            resource=resource, tier=tier, amount=str(amount), effective_day=effective_day
        )
        return self._unary(self.billing.SetPrice, request).price

    def list_prices(self, include_superseded: bool = False) -> billing_pb2.ListPricesResponse:
        """The book's currency and its prices in force and scheduled (any key)."""
        request = billing_pb2.ListPricesRequest(include_superseded=include_superseded)
        return self._unary(self.billing.ListPrices, request)

    def define_plan(self, name: str, allowances: Mapping[str, int]) -> billing_pb2.Plan:
        """A plan including, each month, `allowances` of "resource" or "resource/tier" in the
        resource's base unit: define_plan("free", {"requests": 10_000, "output_tokens": 100_000})."""
        included = []
        for named, quantity in allowances.items():
            resource, _, tier = named.partition("/")
            included.append(billing_pb2.Allowance(resource=resource, tier=tier, quantity=quantity))
        request = billing_pb2.DefinePlanRequest(plan=billing_pb2.Plan(name=name, allowances=included))
        return self._unary(self.billing.DefinePlan, request).plan

    def list_plans(self) -> list[billing_pb2.Plan]:
        return list(self._unary(self.billing.ListPlans, billing_pb2.ListPlansRequest()).plans)

    def set_tenant_plan(self, tenant: str, plan: str, start_month: str = "") -> billing_pb2.TenantPlan:
        """Put `tenant` on `plan` from `start_month` (YYYY-MM, default the current month)."""
        request = billing_pb2.SetTenantPlanRequest(tenant=tenant, plan=plan, start_month=start_month)
        return self._unary(self.billing.SetTenantPlan, request).tenant_plan

    def get_invoice(self, tenant: str, month: str) -> billing_pb2.Invoice:
        """The invoice of `month` (YYYY-MM): as stored once finalized, else computed now."""
        request = billing_pb2.GetInvoiceRequest(tenant=tenant, month=month)
        return self._unary(self.billing.GetInvoice, request).invoice

    def finalize_invoice(self, tenant: str, month: str) -> billing_pb2.Invoice:
        """Store and number the invoice of a month that is over (again: the stored one)."""
        request = billing_pb2.FinalizeInvoiceRequest(tenant=tenant, month=month)
        return self._unary(self.billing.FinalizeInvoice, request).invoice

    def create_credit_note(
        self, tenant: str, invoice_number: str, amount: str | Decimal, reason: str
    ) -> billing_pb2.CreditNote:
        request = billing_pb2.CreateCreditNoteRequest(
            tenant=tenant, invoice_number=invoice_number, amount=str(amount), reason=reason
        )
        return self._unary(self.billing.CreateCreditNote, request).credit_note

    def get_spend(self, tenant: str) -> billing_pb2.Spend:
        """The current month so far, its forecast and the tenant's budget."""
        return self._unary(self.billing.GetSpend, billing_pb2.GetSpendRequest(tenant=tenant)).spend

    def set_budget(self, tenant: str, amount: str | Decimal) -> billing_pb2.Budget:
        """A monthly budget; "0" removes it."""
        request = billing_pb2.SetBudgetRequest(tenant=tenant, amount=str(amount))
        return self._unary(self.billing.SetBudget, request).budget

    # --- training jobs ----------------------------------------------------------------------
    @property
    def trainer(self) -> trainer_pb2_grpc.TrainerServiceStub:
        return trainer_pb2_grpc.TrainerServiceStub(self.channel)

    def train(
        self, model: str, architecture: str, dataset: str, *, parent_version: int = 0, **options: Any
    ) -> trainer_pb2.Job:
        """Queue a training job; the result is registered as a new version of `model`.

        `dataset` is a built-in name (digits, iris, wine, breast_cancer, diabetes, shakespeare) or a
        dataset of your tenant in the registry ("name", or "name@3" for version 3). Options are the
        TrainingSpec fields (epochs=10, learning_rate=1e-3, optimizer="adamw", schedule="cosine",
        batch_size, workers, device, seed, ...) plus the architecture's hyperparameters
        (hidden_sizes=[128], channels=[32, 64], cell="gru", block_size=64, ...)."""
        request = trainer_pb2.CreateTrainingJobRequest(
            spec=training_spec(architecture, dataset, **options), model=model, parent_version=parent_version
        )
        return self._unary(self.trainer.CreateTrainingJob, request).job

    def get_job(self, job_id: str) -> trainer_pb2.Job:
        return self._unary(self.trainer.GetJob, trainer_pb2.GetJobRequest(id=job_id)).job

    def list_jobs(self, state: str = "") -> list[trainer_pb2.Job]:
        """All jobs of your tenant, newest first; `state` filters, e.g. "running"."""
        value = trainer_pb2.JobState.Value(f"JOB_STATE_{state.upper()}") if state else 0
        return self._paged(lambda token: self._unary(
            self.trainer.ListJobs, trainer_pb2.ListJobsRequest(state=value, page_token=token)), "jobs")

    def cancel_job(self, job_id: str) -> trainer_pb2.Job:
        return self._unary(self.trainer.CancelJob, trainer_pb2.CancelJobRequest(id=job_id)).job

    def watch_job(self, job_id: str, after_sequence: int = 0, timeout: float | None = None) -> Iterator[trainer_pb2.JobEvent]:
        """The job's events, history first, until its terminal event (JobEvent.finished)."""
        request = trainer_pb2.WatchJobRequest(id=job_id, after_sequence=after_sequence)
        try:
            for response in self.trainer.WatchJob(request, metadata=self._metadata, timeout=timeout):
                yield response.event
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def wait_job(self, job_id: str, timeout: float | None = None) -> trainer_pb2.Job:
        """Block until the job ends; returns it in its terminal state."""
        for _ in self.watch_job(job_id, timeout=timeout):
            pass
        return self.get_job(job_id)

    def optimize(self, model: str, version: int, method: str, *, into: str = "", **options: Any) -> trainer_pb2.Job:
        """Queue an optimization job on a version; the result is registered as a new version of
        `into` (default `model`) with its precision, size, accuracy and latency beside the parent's
        (Job.result.metrics and parent_metrics once it SUCCEEDED).

        `method` and its options: "quantize" (precision="int8" or "fp16"); "prune" (target_sparsity=0.5,
        finetune_epochs=3, learning_rate); "distill" (student="mlp" with its hyperparameters such as
        hidden_sizes=[32], temperature=4, alpha=0.7, epochs=30, learning_rate, batch_size); "export"
        (ONNX). All take dataset (default: the data and split a trained version was made with; an
        uploaded version has none, and then distill and fine-tuning need one), seed, device."""
        request = trainer_pb2.CreateOptimizationJobRequest(
            spec=optimization_spec(model, version, method, **options), model=into)
        return self._unary(self.trainer.CreateOptimizationJob, request).job

    # --- retraining policies ------------------------------------------------------------------
    def set_retrain_policy(
        self,
        model: str,
        *,
        on: str,
        dataset: str,
        from_version: int = 0,
        metric: str = "",
        min_gain: float = 0.0,
        action: str = "register",
        alias: str = "",
        deployment: str = "",
        canary_weight: int = 0,
        canary_window: int = 0,
        canary_max_error_rate: float = 0.0,
        interval: int = 0,
        drift_threshold: float = 0.0,
        cooldown: int = 0,
    ) -> trainer_pb2.RetrainPolicy:
        """Store (or replace) the model's retraining policy; returns it with its defaults.

        `on`: "new-dataset-version" (a version of `dataset` uploaded), "schedule" (every `interval`
        seconds, at least 60) or "drift" (the drift monitor reports `deployment` past
        `drift_threshold`, default 0.2). Each run retrains with the spec that made `from_version`
        (0: the newest version training made) on `dataset`'s newest version, then measures the
        candidate and the serving version on the same test split by `metric` (accuracy or r2).
        A candidate that gains at least `min_gain` is, per `action`: "register"ed only; given
        `alias`; or a "canary" on `deployment` (`canary_weight` percent, default 10) promoted
        once it held `canary_window` seconds (default 60) without being rolled back. Runs are at
        least `cooldown` seconds apart (default 600) unless started by trigger_retrain."""
        triggers = {"new-dataset-version": trainer_pb2.RETRAIN_TRIGGER_NEW_DATASET_VERSION,
                    "schedule": trainer_pb2.RETRAIN_TRIGGER_SCHEDULE, "drift": trainer_pb2.RETRAIN_TRIGGER_DRIFT}
        actions = {"register": trainer_pb2.RETRAIN_ACTION_UNSPECIFIED, "alias": trainer_pb2.RETRAIN_ACTION_ALIAS,
                   "canary": trainer_pb2.RETRAIN_ACTION_CANARY}
        if on not in triggers:
            raise ValueError(f"on must be one of {', '.join(triggers)}, not {on!r}")
        if action not in actions:
            raise ValueError(f"action must be one of {', '.join(actions)}, not {action!r}")
        policy = trainer_pb2.RetrainPolicy(
            model=model, trigger=triggers[on], dataset=dataset, from_version=from_version, metric=metric,
            min_gain=min_gain, action=actions[action], alias=alias, deployment=deployment,
            canary_weight_percent=canary_weight, canary_window_seconds=canary_window,
            canary_max_error_rate=canary_max_error_rate, interval_seconds=interval, drift_threshold=drift_threshold,
            cooldown_seconds=cooldown,
        )
        request = trainer_pb2.SetRetrainPolicyRequest(policy=policy)
        return self._unary(self.trainer.SetRetrainPolicy, request).policy

    def get_retrain_policy(self, model: str) -> trainer_pb2.GetRetrainPolicyResponse:
        """The policy, its latest runs (newest first) and events (oldest first)."""
        return self._unary(self.trainer.GetRetrainPolicy, trainer_pb2.GetRetrainPolicyRequest(model=model))

    def delete_retrain_policy(self, model: str) -> None:
        """Delete the policy and its history; a run in progress stops (its canary rolled back)."""
        self._unary(self.trainer.DeleteRetrainPolicy, trainer_pb2.DeleteRetrainPolicyRequest(model=model))

    def trigger_retrain(self, model: str) -> trainer_pb2.RetrainRun:
        """Start a run of the model's policy now, whatever its trigger and cooldown."""
        return self._unary(self.trainer.TriggerRetrain, trainer_pb2.TriggerRetrainRequest(model=model)).run


def replica_fields(
    replicas: int | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    target_in_flight: int | None = None,
) -> dict[str, int]:
    """The Deployment's scaling fields that were given: `replicas` is a fixed count, the same
    as min_replicas = max_replicas; it cannot be combined with either."""
    if replicas is not None and (min_replicas is not None or max_replicas is not None):
        raise ValueError(
            "give replicas (a fixed count) or min_replicas/max_replicas (an autoscaled range), not both"
        )
    if replicas is not None:
        if replicas < 1:
            raise ValueError(f"replicas must be 1 or more, not {replicas}; to scale to zero give min_replicas=0")
        min_replicas = max_replicas = replicas
    given = {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_in_flight": target_in_flight}
    for field, value in given.items():
        if value is not None and value < 0:
            raise ValueError(f"{field} must be 0 or more, not {value}")
    if min_replicas is not None and max_replicas and max_replicas < min_replicas:
        raise ValueError(f"max_replicas ({max_replicas}) is below min_replicas ({min_replicas})")
    return {field: value for field, value in given.items() if value is not None}


ARCHITECTURE_FIELDS = {
    "linear": (), "logistic": (), "mlp": ("hidden_sizes", "dropout"),
    "cnn": ("channels", "hidden_size", "dropout"),
    "recurrent": ("cell", "hidden_size", "num_layers", "dropout"),
    "gpt": ("block_size", "embedding_dim", "num_layers", "num_heads", "dropout"),
}
BUILTIN_DATASETS = ("digits", "iris", "wine", "breast_cancer", "diabetes", "shakespeare")


def _architecture(architecture: str, options: dict[str, Any]) -> trainer_pb2.Architecture:
    """The architecture message; takes its hyperparameters out of `options`."""
    if architecture not in ARCHITECTURE_FIELDS:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURE_FIELDS)}")
    params = {k: options.pop(k) for k in ARCHITECTURE_FIELDS[architecture] if k in options}
    if "cell" in params:
        params["cell"] = trainer_pb2.RecurrentCell.Value(f"RECURRENT_CELL_{params['cell'].upper()}")
    return trainer_pb2.Architecture(**{architecture: params})


def _dataset_source(dataset: str, options: dict[str, Any]) -> trainer_pb2.DatasetSource:
    """A built-in name, or a registry dataset "name" / "name@3"; takes max_samples and task out of `options`."""
    source = trainer_pb2.DatasetSource(max_samples=options.pop("max_samples", 0))
    if task := options.pop("task", ""):
        source.task = trainer_pb2.Task.Value(f"TASK_{task.upper()}")
    if dataset in BUILTIN_DATASETS:
        source.builtin = dataset
    else:
        name, _, version = dataset.partition("@")
        source.registry.name, source.registry.version = name, int(version or 0)
    return source


def optimization_spec(model: str, version: int, method: str, **options: Any) -> trainer_pb2.OptimizationSpec:
    """An OptimizationSpec from plain values; see Client.optimize."""
    spec = trainer_pb2.OptimizationSpec(model=model, version=version, seed=options.pop("seed", None))
    if dataset := options.pop("dataset", ""):
        spec.dataset.CopyFrom(_dataset_source(dataset, options))
    if device := options.pop("device", ""):
        spec.device = 0 if device.upper() == "AUTO" else trainer_pb2.Device.Value(f"DEVICE_{device.upper()}")
    if method == "quantize":
        spec.quantize.precision = trainer_pb2.Precision.Value(f"PRECISION_{options.pop('precision').upper()}")
    elif method == "prune":
        spec.prune.CopyFrom(trainer_pb2.PruneMethod(**options))
    elif method == "distill":
        student = _architecture(options.pop("student"), options)
        spec.distill.CopyFrom(trainer_pb2.DistillMethod(student=student, **options))
    elif method == "export":
        spec.export.SetInParent()
    else:
        raise ValueError(f"unknown method {method!r}; choose one of quantize, prune, distill, export")
    return spec


def training_spec(architecture: str, dataset: str, **options: Any) -> trainer_pb2.TrainingSpec:
    """A TrainingSpec from plain values; see Client.train."""
    arch = _architecture(architecture, options)
    source = _dataset_source(dataset, options)
    enums = {"optimizer": "OPTIMIZER", "schedule": "SCHEDULE", "device": "DEVICE"}
    for field, prefix in enums.items():
        if field in options:
            value = options.pop(field).upper()
            options[field] = 0 if value in ("AUTO", "CONSTANT") else trainer_pb2.DESCRIPTOR.enum_types_by_name[
                prefix.title()].values_by_name[f"{prefix}_{value}"].number
    return trainer_pb2.TrainingSpec(architecture=arch, dataset=source, **options)
