"""The deployments table on SQLite, and on the PostgreSQL server when it is there."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from maas.common.v1 import common_pb2

from services.common.database import make_engine, upgrade
from services.common.errors import AlreadyExists
from services.common.validation import Page
from services.inference.server import MIGRATIONS
from services.inference.store import FAILED, LOADING, READY, Canary, Deployment, DeploymentStore, now


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'inference.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database_url: str):
    engine = make_engine(database_url)
    upgrade(engine, MIGRATIONS)
    upgrade(engine, MIGRATIONS)  # a second start-up finds the schema current
    yield DeploymentStore(engine)
    engine.dispose()


def deployment(name: str = "web", tenant: str = "acme", **changes) -> Deployment:
    deployment_id = uuid.uuid4().hex
    values = dict(
        id=deployment_id,
        tenant=tenant,
        name=name,
        model="digits",
        version=None,
        alias="production",
        resolved_version=3,
        instances=2,
        max_batch_size=16,
        device="AUTO",
        cacheable=True,
        state=LOADING,
        message="loading version 3",
        triton_model=f"m_{deployment_id}",
        sha256="cd" * 32,
        format="ONNX",
        signature=common_pb2.Signature(
            inputs=[common_pb2.TensorSpec(name="x", datatype=common_pb2.DATA_TYPE_FP32, shape=[-1, 4])],
            outputs=[common_pb2.TensorSpec(name="y", datatype=common_pb2.DATA_TYPE_INT64, shape=[])],
        ),
        create_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        update_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        precision="int8",
        tier="int8",
    )
    values.update(changes)
    return Deployment(**values)


def test_create_and_get_round_trip_every_field(store: DeploymentStore):
    created = store.create(deployment())
    assert store.get("acme", "web") == created
    assert store.get("other", "web") is None
    assert store.get("acme", "missing") is None


def test_a_canary_round_trips_with_its_tier(store: DeploymentStore):
    canary = Canary(2, 10, 0.5, READY, "", "m_canary", "ef" * 32, "TORCHSCRIPT", tier="distilled")
    created = store.create(deployment(canary=canary))
    assert store.get("acme", "web") == created


def test_a_row_from_before_tiers_reads_as_its_precisions_tier(store: DeploymentStore):
    """Rows the 0006 migration gave an empty tier: the precision's (a distillation is not told
    by the precision), and full precision for a canary, whose precision the table does not keep."""
    canary = Canary(2, 10, 0.5, READY, "", "m_canary", "ef" * 32, "TORCHSCRIPT")
    store.create(deployment(name="old-int8", tier="", canary=canary))
    store.create(deployment(name="old-untagged", tier="", precision=""))
    old = store.get("acme", "old-int8")
    assert (old.tier, old.canary.tier) == ("int8", "fp32")
    assert store.get("acme", "old-untagged").tier == "fp32"


def test_names_are_unique_per_tenant_only(store: DeploymentStore):
    store.create(deployment())
    with pytest.raises(AlreadyExists, match="'web' already exists"):
        store.create(deployment())
    store.create(deployment(tenant="other"))


def test_list_is_keyset_paged_by_name_within_the_tenant(store: DeploymentStore):
    for name in ("b", "d", "a", "c"):
        store.create(deployment(name=name))
    store.create(deployment(name="a0", tenant="other"))
    assert [d.name for d in store.list_page("acme", Page(2, ""))] == [
        "a",
        "b",
        "c",
    ]  # one extra: a next page exists
    assert [d.name for d in store.list_page("acme", Page(2, "b"))] == ["c", "d"]
    assert [d.name for d in store.list_page("other", Page(10, ""))] == ["a0"]
    assert [d.name for d in store.all()] == ["b", "d", "a", "c", "a0"]


def test_save_and_set_state(store: DeploymentStore):
    created = store.create(deployment())
    moved = created.replace(version=4, alias=None, resolved_version=4, instances=1, update_time=now())
    assert store.save(moved)
    assert store.get("acme", "web").version == 4
    ready = store.set_state(created.id, READY, "")
    assert (ready.state, ready.message, ready.resolved_version) == (READY, "", 4)
    assert ready.update_time > created.update_time
    assert store.set_state("no-such-id", FAILED, "gone") is None
    assert not store.save(deployment(name="never-created"))


def test_delete_is_scoped_by_tenant(store: DeploymentStore):
    store.create(deployment())
    assert store.delete("other", "web") is None
    assert store.delete("acme", "web").name == "web"
    assert store.get("acme", "web") is None
    assert store.delete("acme", "web") is None
