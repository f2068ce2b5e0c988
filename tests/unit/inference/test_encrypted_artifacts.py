"""Deploying encrypted artifacts: the inference service's real registry client against the real
registry (real crypto, real files) with a fake Triton. An artifact whose ciphertext was damaged
fails its deployment with the registry's reason and nothing of it reaches the node; after a KEK
rotation every version still deploys."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from maas.registry.v1 import registry_pb2

from services.common.server import running
from services.inference.artifacts import Registry as RegistryClient
from services.inference.deployments import DeploymentSpec
from services.inference.store import FAILED, READY
from services.registry.config import RegistrySettings
from services.registry.server import create_app
from tests.unit.inference.conftest import build_deployments
from tests.unit.inference.inference_fakes import TENANT
from tests.unit.inference.test_inference_service import wait_state
from tests.unit.registry.conftest import TOKEN, TenantStub


def torchscript(seed: int) -> bytes:
    import torch

    torch.manual_seed(seed)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), buffer)
    return buffer.getvalue()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[TenantStub, RegistryClient, RegistrySettings]]:
    settings = RegistrySettings(home=tmp_path / "registry", registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_app(settings)) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = TenantStub(channel, TENANT)
            await stub.create_model("digits")
            yield stub, RegistryClient(channel, TOKEN, timeout=30), settings


async def test_a_damaged_artifact_fails_its_deployment_and_a_rotation_keeps_them_deployable(
    registry, store, nodes, triton, repository, tmp_path: Path
) -> None:
    stub, client, settings = registry
    artifacts = [torchscript(seed) for seed in range(3)]
    for artifact in artifacts:
        await stub.upload("digits", artifact)
    deployments = build_deployments(store, client, nodes, tmp_path)
    await deployments.converger.restore()
    await deployments.converger.reconcile()
    try:
        await deployments.create(TENANT, DeploymentSpec(name="good", model="digits", version=1))
        await wait_state(deployments, "good", READY, timeout=30)

        digest = hashlib.sha256(artifacts[1]).hexdigest()
        blob = settings.registry_blob_dir / "sha256" / digest[:2] / digest
        damaged = bytearray(blob.read_bytes())
        damaged[len(damaged) // 2] ^= 0x01
        blob.write_bytes(bytes(damaged))
        created = await deployments.create(TENANT, DeploymentSpec(name="damaged", model="digits", version=2))
        failed = await wait_state(deployments, "damaged", FAILED, timeout=30)
        assert "damaged and were not served" in failed.message and digest in failed.message
        assert created.triton_model not in triton.loaded and not repository.path(created.triton_model).exists()
        assert not (tmp_path / "artifacts" / digest).exists()

        rotated = await stub.RotateKek(registry_pb2.RotateKekRequest())
        assert rotated.rewrapped_keys == 3
        await deployments.create(TENANT, DeploymentSpec(name="after", model="digits", version=3))
        ready = await wait_state(deployments, "after", READY, timeout=30)
        model_file = repository.path(ready.triton_model) / "1" / "model.pt"
        assert model_file.read_bytes() == artifacts[2]  # plaintext only on the node that serves it
    finally:
        await deployments.close()
