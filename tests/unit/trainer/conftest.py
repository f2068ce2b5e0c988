"""Fixtures for the trainer tests: a real registry and a trainer in-process on port 0, and stubs
that send a tenant's internal metadata."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from maas.registry.v1 import registry_pb2_grpc
from maas.trainer.v1 import trainer_pb2, trainer_pb2_grpc

from services.common.channels import internal_metadata
from services.common.server import RunningServer, running
from services.registry.config import RegistrySettings
from services.registry.server import create_app as create_registry
from services.trainer.config import TrainerSettings
from services.trainer.server import create_app as create_trainer

TOKEN = "test-internal-token"
TERMINAL = (trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED)


class TenantStub:
    """A service stub as one tenant sees it: every call carries that tenant's metadata."""

    def __init__(self, stub: object, tenant: str) -> None:
        self._stub = stub
        self.metadata = internal_metadata(TOKEN, tenant)

    def __getattr__(self, method: str):
        return functools.partial(getattr(self._stub, method), metadata=self.metadata)


async def watch(stub: TenantStub, job_id: str, after: int = 0) -> list[trainer_pb2.JobEvent]:
    request = trainer_pb2.WatchJobRequest(id=job_id, after_sequence=after)
    return [response.event async for response in stub.WatchJob(request, timeout=300)]


def trainer_settings(home: Path, registry_port: int, **overrides) -> TrainerSettings:
    return TrainerSettings(
        home=home, trainer_addr="127.0.0.1:0", registry_addr=f"127.0.0.1:{registry_port}",
        internal_token=TOKEN, **overrides,
    )


@pytest.fixture
async def registry_server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    settings = RegistrySettings(home=tmp_path, registry_addr="127.0.0.1:0", internal_token=TOKEN)
    async with running(await create_registry(settings)) as server:
        yield server


@pytest.fixture
def settings(tmp_path: Path, registry_server: RunningServer) -> TrainerSettings:
    return trainer_settings(tmp_path, registry_server.port)


@pytest.fixture
async def trainer_server(settings: TrainerSettings) -> AsyncIterator[RunningServer]:
    async with running(await create_trainer(settings)) as server:
        yield server


@pytest.fixture
async def channels(registry_server: RunningServer, trainer_server: RunningServer):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as registry, \
            grpc.aio.insecure_channel(f"127.0.0.1:{trainer_server.port}") as trainer:
        yield registry, trainer


@pytest.fixture
def trainer(channels) -> TenantStub:
    return TenantStub(trainer_pb2_grpc.TrainerServiceStub(channels[1]), "tenant-a")


@pytest.fixture
def other_trainer(channels) -> TenantStub:
    return TenantStub(trainer_pb2_grpc.TrainerServiceStub(channels[1]), "tenant-b")


@pytest.fixture
def registry(channels) -> TenantStub:
    return TenantStub(registry_pb2_grpc.RegistryServiceStub(channels[0]), "tenant-a")


@pytest.fixture
def other_registry(channels) -> TenantStub:
    return TenantStub(registry_pb2_grpc.RegistryServiceStub(channels[0]), "tenant-b")
