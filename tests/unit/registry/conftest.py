"""Fixtures for the registry tests: settings on tmp_path, an in-process server on port 0, and
stubs that send a tenant's internal metadata. Artifacts are built here, never downloaded."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import io
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2, registry_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from services.common.channels import internal_metadata
from services.common.server import RunningServer, running
from services.registry.config import RegistrySettings
from services.registry.server import create_app

TOKEN = "test-internal-token"
CHUNK = 64 * 1024
# What the tests look for in every stored byte: 64 bytes no ciphertext holds by chance.
MARKER = b"MAAS-PLAINTEXT-MARKER-" + hashlib.sha256(b"encryption at rest").hexdigest()[:42].encode()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def linear_signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[2])],
    )


def upload_requests(
    model: str,
    data: bytes,
    *,
    format: int = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
    sha256: str | None = None,
    size_bytes: int | None = None,
    signature: common_pb2.Signature | None = None,
    chunk_bytes: int = CHUNK,
    **header_fields,
) -> Iterator[registry_pb2.UploadVersionRequest]:
    """The messages of an UploadVersion stream: the header, then the data in chunks."""
    yield registry_pb2.UploadVersionRequest(
        header=registry_pb2.VersionHeader(
            model=model,
            format=format,
            signature=signature if signature is not None else linear_signature(),
            sha256=sha256 if sha256 is not None else sha256_of(data),
            size_bytes=size_bytes if size_bytes is not None else len(data),
            **header_fields,
        )
    )
    for start in range(0, len(data), chunk_bytes):
        yield registry_pb2.UploadVersionRequest(chunk=data[start : start + chunk_bytes])


def dataset_requests(
    dataset: str, data: bytes, **header_fields
) -> Iterator[registry_pb2.UploadDatasetVersionRequest]:
    header = {"sha256": sha256_of(data), "size_bytes": len(data), **header_fields}
    yield registry_pb2.UploadDatasetVersionRequest(
        header=registry_pb2.DatasetVersionHeader(dataset=dataset, **header)
    )
    for start in range(0, len(data), CHUNK):
        yield registry_pb2.UploadDatasetVersionRequest(chunk=data[start : start + CHUNK])


class TenantStub:
    """The registry stub as one tenant sees it: every call carries that tenant's metadata."""

    def __init__(self, channel: grpc.aio.Channel, tenant: str, token: str = TOKEN) -> None:
        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.metadata = internal_metadata(token, tenant)

    def __getattr__(self, method: str):
        return functools.partial(getattr(self._stub, method), metadata=self.metadata)

    async def create_model(self, name: str, **fields) -> registry_pb2.Model:
        response = await self.CreateModel(registry_pb2.CreateModelRequest(name=name, **fields))
        return response.model

    async def upload(self, model: str, data: bytes, **options) -> registry_pb2.Version:
        response = await self.UploadVersion(upload_requests(model, data, **options))
        return response.version

    async def download(self, model: str, version: int) -> tuple[registry_pb2.Version, bytes]:
        responses = [
            r
            async for r in self.DownloadVersion(
                registry_pb2.DownloadVersionRequest(model=model, version=version)
            )
        ]
        assert responses[0].WhichOneof("part") == "version"
        assert all(r.WhichOneof("part") == "chunk" for r in responses[1:])
        return responses[0].version, b"".join(r.chunk for r in responses[1:])


def blob_files(settings: RegistrySettings) -> list[Path]:
    """Every file under the blob dir, temp files included."""
    return sorted(p for p in settings.registry_blob_dir.rglob("*") if p.is_file())


def temp_files(settings: RegistrySettings) -> list[Path]:
    return sorted((settings.registry_blob_dir / "tmp").iterdir())


@pytest.fixture(scope="session")
def torchscript_bytes() -> bytes:
    """A tiny scripted nn.Linear(4, 2), as torch.jit.save writes it."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 deprecates TorchScript in favour of torch.export; it still writes the format.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), buffer)
    return buffer.getvalue()


def make_onnx(weight: float = 0.5, outputs: int = 2) -> bytes:
    """A small valid ONNX model y = x @ W, W of shape [4, outputs] filled with `weight`."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, outputs])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [4, outputs], [weight] * 4 * outputs)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def marked_onnx(padding_bytes: int, seed: int = 0) -> bytes:
    """A valid ONNX model y = x @ W whose doc string is MARKER, padded with an unused random
    initializer to span several sealed chunks."""
    padding = np.random.default_rng(seed).integers(0, 255, padding_bytes, dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, [4, 2], [0.5] * 8),
            numpy_helper.from_array(padding, "padding"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=MARKER.decode())
    onnx.checker.check_model(model)
    return model.SerializeToString()


async def expect_status(code: grpc.StatusCode, call: Awaitable, match: str = "") -> grpc.aio.AioRpcError:
    """Await a call that must fail with `code` (and a message containing `match`)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    assert match in (caught.value.details() or ""), caught.value.details()
    return caught.value


async def wait_until(condition: Callable[[], object], timeout: float = 1.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout} s")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def onnx_bytes() -> bytes:
    return make_onnx()


@pytest.fixture
def registry_settings(tmp_path: Path) -> RegistrySettings:
    return RegistrySettings(
        home=tmp_path,
        registry_addr="127.0.0.1:0",
        internal_token=TOKEN,
        registry_chunk_bytes=CHUNK,
    )


@pytest.fixture
async def registry_server(registry_settings: RegistrySettings) -> AsyncIterator[RunningServer]:
    async with running(await create_app(registry_settings)) as server:
        yield server


@pytest.fixture
async def channel(registry_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> TenantStub:
    return TenantStub(channel, "tenant-a")


@pytest.fixture
def other_stub(channel: grpc.aio.Channel) -> TenantStub:
    return TenantStub(channel, "tenant-b")
