"""What a caller may ask of a deployment, checked: the fields of a DeploymentSpec and the
version it names (a registry version Triton can serve), and what follows from that version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2
from maas.tiers import tier_of_version

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.serving import GENERATE, PREDICT, task_of_metadata
from services.common.tensors import BY_PROTO, check_signature
from services.common.validation import check_name
from services.inference.artifacts import Registry
from services.inference.repository import RUNNER_METADATA_KEYS

DEVICES = ("AUTO", "CPU", "GPU")
MAX_INSTANCES = 16
MAX_BATCH_SIZE = 1024
DEFAULT_INSTANCES = 1
DEFAULT_MAX_BATCH_SIZE = 8
MAX_EXECUTION_LIMIT_SECONDS = 3600
MAX_REPLICAS = 64
MAX_TARGET_IN_FLIGHT = 10_000
FORMATS = {
    registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT: "TORCHSCRIPT",
    registry_pb2.ARTIFACT_FORMAT_ONNX: "ONNX",
    registry_pb2.ARTIFACT_FORMAT_SAFETENSORS: "SAFETENSORS",
}
# The generic runner feeds numeric tensors to torch and onnxruntime; strings and bfloat16 it cannot.
UNSERVED_DATATYPES = {common_pb2.DATA_TYPE_BYTES, common_pb2.DATA_TYPE_BF16}


@dataclass(frozen=True)
class DeploymentSpec:
    """What a caller asks for. Zero values mean "the default"."""

    name: str
    model: str = ""
    version: int | None = None
    alias: str | None = None
    instances: int = 0
    max_batch_size: int = 0
    device: str = ""
    cacheable: bool = False
    execution_limit_seconds: int = 0
    min_replicas: int | None = None  # None: 1
    max_replicas: int = 0  # 0: the same as min_replicas (at least 1)
    target_in_flight: int = 0  # 0: the service's default


@dataclass(frozen=True)
class Replicas:
    """A deployment's replica bounds, checked."""

    min_replicas: int
    max_replicas: int
    target_in_flight: int


def checked_replicas(min_replicas: int | None, max_replicas: int, target_in_flight: int) -> Replicas:
    lowest = 1 if min_replicas is None else min_replicas
    if not 0 <= lowest <= MAX_REPLICAS:
        raise InvalidArgument(f"min_replicas must be between 0 and {MAX_REPLICAS}, got {lowest}")
    highest = max_replicas or max(lowest, 1)
    if not 1 <= highest <= MAX_REPLICAS:
        raise InvalidArgument(f"max_replicas must be between 1 and {MAX_REPLICAS} (0: as min_replicas), got {highest}")
    if highest < lowest:
        raise InvalidArgument(f"max_replicas ({highest}) must not be below min_replicas ({lowest})")
    if not 0 <= target_in_flight <= MAX_TARGET_IN_FLIGHT:
        raise InvalidArgument(
            f"target_in_flight must be between 1 and {MAX_TARGET_IN_FLIGHT} (0: the service's default), got {target_in_flight}"
        )
    return Replicas(lowest, highest, target_in_flight)


async def deployable_version(
    registry: Registry, tenant: str, model: str, version: int | None, alias: str | None
) -> registry_pb2.Version:
    """The registry's version, if Triton can serve it; FAILED_PRECONDITION saying why not."""
    found = await registry.get_version(tenant, model, version, alias)
    label = f"version {found.version} of model {model!r}"
    if found.state == registry_pb2.VERSION_STATE_ARCHIVED:
        raise FailedPrecondition(f"{label} is archived: deploy a version that is not")
    if found.format not in FORMATS:
        raise FailedPrecondition(f"{label} has no TorchScript or ONNX artifact, nor a safetensors language model: nothing Triton can serve")
    try:
        check_signature(found.signature)
    except InvalidArgument as exc:
        raise FailedPrecondition(f"{label} has an unusable signature: {exc}") from None
    task = task_of_metadata(found.metadata)
    if found.format == registry_pb2.ARTIFACT_FORMAT_SAFETENSORS:
        if task != GENERATE:
            raise FailedPrecondition(
                f"{label} is a safetensors artifact: deployments serve those as language models "
                "(metadata task `language`, as `maas import-hf` sets it)"
            )
        return found  # its runner reads config, tokenizer and chat template from the artifact
    if task == GENERATE:
        if found.format != registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT:
            raise FailedPrecondition(f"{label} is a language model: text generation serves TorchScript (the trainer's GPT) or safetensors (imported models)")
        if not found.metadata.get("vocabulary"):
            raise FailedPrecondition(
                f"{label} is a language model without a `vocabulary` in its metadata "
                "(its characters in token order): text generation cannot encode prompts"
            )
    if task != PREDICT:
        return found  # runners of other tasks read their own inputs (text), not the signature's
    for tensor in [*found.signature.inputs, *found.signature.outputs]:
        if tensor.datatype in UNSERVED_DATATYPES:
            raise FailedPrecondition(
                f"{label}: tensor {tensor.name!r} is {BY_PROTO[tensor.datatype].triton}; "
                "deployments serve numeric tensors (BOOL, integers, FP16, FP32, FP64)"
            )
    return found


def serving_fields(version: registry_pb2.Version) -> dict[str, Any]:
    """The deployment fields that follow from the version it serves."""
    task = task_of_metadata(version.metadata)
    return {
        "task": task,
        "artifact_bytes": version.size_bytes,
        "precision": version.precision or "fp32",
        "tier": tier_of_version(version),
        "runner_metadata": {
            key: version.metadata[key] for key in RUNNER_METADATA_KEYS[task] if key in version.metadata
        },
    }


def checked_device(device: str, gpu_available: bool) -> str:
    device = device or "AUTO"
    if device not in DEVICES:
        raise InvalidArgument(f"device must be one of {list(DEVICES)}")
    if device == "GPU" and not gpu_available:
        raise FailedPrecondition("device GPU was asked for but the inference host has no GPU; use AUTO or CPU")
    return device


def check_target(version: int | None, alias: str | None) -> None:
    if version is not None and version < 1:
        raise InvalidArgument(f"version must be 1 or more, got {version}")
    if alias is not None:
        check_name("alias", alias)


def checked_execution_limit(seconds: int) -> int:
    """0 (the service's default) or 1 to MAX_EXECUTION_LIMIT_SECONDS."""
    if seconds and not 1 <= seconds <= MAX_EXECUTION_LIMIT_SECONDS:
        raise InvalidArgument(
            f"execution_limit_seconds must be between 1 and {MAX_EXECUTION_LIMIT_SECONDS} "
            f"(0: the service's default), got {seconds}"
        )
    return seconds


def checked_range(field: str, value: int, maximum: int) -> int:
    if not 1 <= value <= maximum:
        raise InvalidArgument(f"{field} must be between 1 and {maximum}, got {value}")
    return value
