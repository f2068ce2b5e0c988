"""Fakes for the inference service's unit tests: a registry and a Triton that live in memory."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from maas.common.v1 import common_pb2
from maas.registry.v1 import registry_pb2
from maas.tiers import PLATFORM_SOURCE, SOURCE_METADATA_KEY
from tritonclient.grpc import service_pb2

from services.common.errors import NotFound
from services.inference.nodes import Capacity, Node, NodeSet
from services.inference.repository import ModelRepository
from services.inference.triton import ModelLoadError

TENANT = "acme"
# The fake model: y = x @ WEIGHTS, 4 features in, 3 out.
WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def linear_signature() -> common_pb2.Signature:
    return common_pb2.Signature(
        inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[4])],
        outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_FP32, shape=[3])],
    )


class FakeRegistry:
    """Versions per (tenant, model); artifacts are plain bytes."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str, int], tuple[registry_pb2.Version, bytes]] = {}
        self.aliases: dict[tuple[str, str, str], int] = {}
        self.downloads = 0
        self.corrupt = False

    def add(
        self,
        model: str,
        number: int,
        *,
        tenant: str = TENANT,
        artifact: bytes = b"torchscript bytes",
        fmt: int = registry_pb2.ARTIFACT_FORMAT_TORCHSCRIPT,
        state: int = registry_pb2.VERSION_STATE_READY,
        signature: common_pb2.Signature | None = None,
        precision: str = "",
        lineage: registry_pb2.Lineage | None = None,
        source: str = PLATFORM_SOURCE,  # who registered it, as the registry records it
    ) -> registry_pb2.Version:
        version = registry_pb2.Version(
            model=model,
            version=number,
            format=fmt,
            signature=signature or linear_signature(),
            sha256=hashlib.sha256(artifact).hexdigest(),
            size_bytes=len(artifact),
            state=state,
            precision=precision,
            lineage=lineage,
            metadata={SOURCE_METADATA_KEY: source},
        )
        self.versions[(tenant, model, number)] = (version, artifact)
        return version

    async def get_version(
        self, tenant: str, model: str, version: int | None, alias: str | None
    ) -> registry_pb2.Version:
        if alias is not None:
            if (tenant, model, alias) not in self.aliases:
                raise NotFound(f"alias {alias!r} of model {model!r} not found")
            version = self.aliases[(tenant, model, alias)]
        if (tenant, model, version) not in self.versions:
            raise NotFound(f"version {version} of model {model!r} not found")
        return self.versions[(tenant, model, version)][0]

    async def chunks(self, tenant: str, model: str, version: int) -> AsyncIterator[bytes]:
        self.downloads += 1
        artifact = self.versions[(tenant, model, version)][1]
        yield b"garbage" if self.corrupt else artifact


class FakeTriton:
    """Loads what the repository holds; answers ModelInfer with x @ WEIGHTS."""

    def __init__(self, repository: ModelRepository, address: str = "127.0.0.1:8001") -> None:
        self.address = address
        self.repository = repository
        self.loaded: set[str] = set()
        self.loads: list[str] = []
        self.fail_loads: str = ""  # when set, every load fails with this message
        self.keep_old_on_failure = True  # what real Triton does when a reload fails
        self.load_delay = 0.0
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.counts: dict[str, tuple[int, int]] = {}  # what request_counts reports
        self.live = True

    async def load(self, triton_model: str, timeout: float) -> None:
        self.loads.append(triton_model)
        await asyncio.sleep(self.load_delay)
        if not (self.repository.path(triton_model) / "config.pbtxt").exists():
            raise ModelLoadError(f"failed to load '{triton_model}': no model directory")
        if self.fail_loads:
            if not self.keep_old_on_failure:
                self.loaded.discard(triton_model)
            raise ModelLoadError(self.fail_loads)
        self.loaded.add(triton_model)

    async def unload(self, triton_model: str) -> None:
        self.loaded.discard(triton_model)

    async def is_live(self, timeout: float = 1.0) -> bool:
        return self.live

    async def is_ready(self, triton_model: str) -> bool:
        return triton_model in self.loaded

    async def loaded_models(self) -> set[str]:
        return set(self.loaded)

    async def request_counts(self, triton_model: str) -> tuple[int, int]:
        return self.counts.get(triton_model, (0, 0))

    async def statistics(self, triton_model: str) -> list[service_pb2.ModelStatistics]:
        succeeded, failed = self.counts.get(triton_model, (0, 0))
        if triton_model not in self.loaded:
            return []
        stats = service_pb2.ModelStatistics(
            name=triton_model, version="1", execution_count=succeeded, inference_count=succeeded
        )
        stats.inference_stats.success.count, stats.inference_stats.fail.count = succeeded, failed
        return [stats]

    async def stream(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        """A decoupled text model: the prompt back, one character per response, then the counts."""
        self.requests.append(request)
        prompt = request.raw_input_contents[0][4:].decode()
        if "~" in prompt:
            yield service_pb2.ModelStreamInferResponse(error_message="invalid input: '~' is not known")
            return
        for character in prompt:
            yield _stream_response(text=character)
        yield _stream_response(text="", finish_reason="length", prompt_tokens=len(prompt), completion_tokens=len(prompt))

    async def infer(
        self, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        self.requests.append(request)
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(
            tuple(request.inputs[0].shape)
        )
        y = x @ WEIGHTS
        response = service_pb2.ModelInferResponse(model_name=request.model_name)
        response.outputs.add(name="y", datatype="FP32", shape=y.shape)
        response.raw_output_contents.append(y.astype(np.float32).tobytes())
        return response


def _stream_response(**outputs) -> service_pb2.ModelStreamInferResponse:
    response = service_pb2.ModelStreamInferResponse()
    for name, value in outputs.items():
        if isinstance(value, str):
            encoded = value.encode()
            response.infer_response.outputs.add(name=name, datatype="BYTES", shape=[1])
            response.infer_response.raw_output_contents.append(len(encoded).to_bytes(4, "little") + encoded)
        else:
            response.infer_response.outputs.add(name=name, datatype="INT64", shape=[1])
            response.infer_response.raw_output_contents.append(value.to_bytes(8, "little", signed=True))
    return response


def one_node(repository: ModelRepository, triton: FakeTriton, name: str = "triton-0") -> NodeSet:
    return NodeSet([Node(name, triton, repository, Capacity(model_slots=16, memory_mb=64_000), embedded=True)])


def fake_fleet(root: Path, count: int, slots: int = 16, memory_mb: int = 64_000) -> tuple[NodeSet, list[FakeTriton]]:
    """`count` nodes, each a FakeTriton over its own repository under `root`."""
    nodes, tritons = [], []
    for index in range(count):
        repository = ModelRepository(root / f"node{index}" / "models", root / f"node{index}" / "staging")
        triton = FakeTriton(repository, address=f"127.0.0.1:{8001 + index}")
        tritons.append(triton)
        nodes.append(Node(f"triton-{index}", triton, repository, Capacity(slots, memory_mb), embedded=False))
    return NodeSet(nodes), tritons
