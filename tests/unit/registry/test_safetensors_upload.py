"""SAFETENSORS versions through the registry's gRPC API: an imported language model uploads with
the text-generation signature, the registry replaces what a tenant claims about it with what the
file says, stores it sealed and hands the same bytes back; a bad file or another signature is
INVALID_ARGUMENT and leaves nothing behind. Optimization and price tiers meet the format too."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from maas import hf_format
from maas.hf_import import GENERATION_SIGNATURE, prepare
from maas.registry.v1 import registry_pb2 as pb
from maas.tiers import FP32, SOURCE_METADATA_KEY, UPLOAD_SOURCE, tier_of_version

from services.common.errors import InvalidArgument
from services.registry.config import RegistrySettings
from services.trainer.optimization_spec import OptimizationSpec, SourceVersion, check_source
from tests.support.hf_models import hf_model_dir
from tests.unit.registry.conftest import (
    TenantStub,
    blob_files,
    expect_status,
    linear_signature,
    upload_requests,
)
from tests.unit.registry.test_registry_downloads import as_role

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SAFETENSORS = pb.ARTIFACT_FORMAT_SAFETENSORS


@pytest.fixture(scope="module")
def gpt2_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    scratch = tmp_path_factory.mktemp("gpt2")
    return prepare(hf_model_dir(scratch, "gpt2"), scratch).path.read_bytes()


async def test_an_imported_model_uploads_and_the_registry_says_what_it_is(
    stub: TenantStub, channel: grpc.aio.Channel, gpt2_bytes: bytes, registry_settings: RegistrySettings
) -> None:
    developer = as_role(channel, "developer")
    await developer.create_model("poet")
    claims = {"architecture": "LlamaForCausalLM", "parameters": "7000000000", "context_length": "131072",
              "dtype": "int4", "task": "classification", "model_type": "llama", "note": "kept"}
    version = (await developer.UploadVersion(upload_requests(
        "poet", gpt2_bytes, format=SAFETENSORS, signature=GENERATION_SIGNATURE, metadata=claims, precision="int8",
    ))).version
    header, data_start = hf_format.read_header(_written(registry_settings, gpt2_bytes))
    assert dict(version.metadata) == {
        "architecture": "GPT2LMHeadModel", "model_type": "gpt2",
        "parameters": str(sum(_count(e["shape"]) for k, e in header.items() if k != "__metadata__")),
        "context_length": "256", "dtype": "float32", "task": "language", "note": "kept",
        SOURCE_METADATA_KEY: UPLOAD_SOURCE,
    }
    assert version.precision == "fp32" and version.format == SAFETENSORS
    assert tier_of_version(version) == FP32

    listed = (await stub.ListVersions(pb.ListVersionsRequest(model="poet"))).versions
    assert [v.format for v in listed] == [SAFETENSORS]
    got, data = await developer.download("poet", 1)
    assert data == gpt2_bytes and got.format == SAFETENSORS
    # Encryption at rest covers it like any blob: no run of its weights is on the disk.
    weights = gpt2_bytes[data_start:data_start + 256]
    assert blob_files(registry_settings)
    assert not any(weights in path.read_bytes() for path in blob_files(registry_settings))


async def test_a_language_model_has_the_generation_signature(stub: TenantStub, gpt2_bytes: bytes) -> None:
    await stub.create_model("poet")
    refused = await expect_status(INVALID, stub.upload("poet", gpt2_bytes, format=SAFETENSORS,
                                                       signature=linear_signature()), "text-generation signature")
    assert "prompt BYTES [1]" in (refused.details() or "")


async def test_a_bad_file_is_invalid_and_leaves_nothing(
    stub: TenantStub, gpt2_bytes: bytes, registry_settings: RegistrySettings
) -> None:
    await stub.create_model("poet")
    header, data_start = _header_of(gpt2_bytes)
    header["__metadata__"][hf_format.CONFIG_KEY] = json.dumps(
        {**json.loads(header["__metadata__"][hf_format.CONFIG_KEY]), "auto_map": {"AutoModel": "evil.Model"}}
    )
    hostile = _with_header(header, gpt2_bytes[data_start:])
    await expect_status(INVALID, stub.upload("poet", hostile, format=SAFETENSORS, signature=GENERATION_SIGNATURE),
                        "auto_map")
    await expect_status(INVALID, stub.upload("poet", gpt2_bytes[:-100], format=SAFETENSORS,
                                             signature=GENERATION_SIGNATURE), "is cut short")
    # Pickles are no safetensors, whatever the header says.
    await expect_status(INVALID, stub.upload("poet", b"\x80\x04\x95" + b"\0" * 64, format=SAFETENSORS,
                                             signature=GENERATION_SIGNATURE), "safetensors header")
    assert blob_files(registry_settings) == []
    assert (await stub.GetModel(pb.GetModelRequest(name="poet"))).model.latest_version == 0


async def test_a_safetensors_file_is_not_an_onnx_model(stub: TenantStub, gpt2_bytes: bytes) -> None:
    await stub.create_model("poet")
    await expect_status(INVALID, stub.upload("poet", gpt2_bytes, format=pb.ARTIFACT_FORMAT_ONNX),
                        "not a valid single-file ONNX model")


def test_optimization_refuses_a_language_model_clearly() -> None:
    source = SourceVersion("poet", 1, "SAFETENSORS", "fp32", {"task": "language"})
    with pytest.raises(InvalidArgument, match="poet version 1 is SAFETENSORS: optimization starts from a "
                                              "TorchScript or ONNX version"):
        check_source(OptimizationSpec("poet", 1, "quantize", precision="int8"), source)


def _written(settings: RegistrySettings, data: bytes) -> Path:
    path = settings.home / "sent.safetensors"
    path.write_bytes(data)
    return path


def _header_of(data: bytes) -> tuple[dict, int]:
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), 8 + length


def _with_header(header: dict, tensor_data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + tensor_data


def _count(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
