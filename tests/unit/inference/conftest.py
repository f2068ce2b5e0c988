"""Fixtures for the inference service's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.database import make_engine, upgrade
from services.inference.artifacts import ArtifactCache
from services.inference.deployments import Deployments
from services.inference.nodes import NodeSet
from services.inference.repository import ModelRepository
from services.inference.server import MIGRATIONS
from services.inference.store import DeploymentStore
from tests.unit.inference.inference_fakes import TENANT, FakeRegistry, FakeTriton, one_node


@pytest.fixture
def engine(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'inference.db'}")
    upgrade(engine, MIGRATIONS)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine) -> DeploymentStore:
    return DeploymentStore(engine)


@pytest.fixture
def registry() -> FakeRegistry:
    registry = FakeRegistry()
    registry.add("digits", 1)
    registry.add("digits", 2, artifact=b"version two")
    registry.aliases[(TENANT, "digits", "production")] = 1
    return registry


@pytest.fixture
def repository(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "models", tmp_path / "staging")


@pytest.fixture
def triton(repository: ModelRepository) -> FakeTriton:
    return FakeTriton(repository)


@pytest.fixture
def nodes(repository: ModelRepository, triton: FakeTriton) -> NodeSet:
    """One node, up: the fake Triton over the test's repository."""
    return one_node(repository, triton)


def build_deployments(store, registry, nodes: NodeSet, tmp_path: Path, **options) -> Deployments:
    """The service's domain over fakes, with short timeouts; `options` override the rest."""
    return Deployments(
        store=store,
        registry=registry,  # type: ignore[arg-type]
        artifacts=ArtifactCache(tmp_path / "artifacts", registry),  # type: ignore[arg-type]
        nodes=nodes,
        gpu_available=False,
        load_timeout=5,
        load_concurrency=2,
        predict_timeout=5,
        **options,
    )


@pytest.fixture
async def deployments(store, registry, nodes, tmp_path: Path) -> AsyncIterator[Deployments]:
    service = build_deployments(store, registry, nodes, tmp_path)
    await service.converger.restore()
    await service.converger.reconcile()
    yield service
    await service.close()
