"""RegistryStore against a migrated SQLite file: tenant scoping, numbering, aliases, deletion."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from services.common.database import make_engine, upgrade
from services.common.errors import AlreadyExists, FailedPrecondition, NotFound
from services.registry.server import MIGRATIONS
from services.registry.store import (
    ArtifactFormat,
    Base,
    DatasetFormat,
    Lineage,
    NewVersion,
    RegistryStore,
    VersionState,
)


def new_version(sha256: str = "a" * 64) -> NewVersion:
    return NewVersion(
        format=ArtifactFormat.TORCHSCRIPT,
        signature=b"\x0a\x00",
        sha256=sha256,
        size_bytes=10,
        metrics={"accuracy": 0.9},
        metadata={"framework": "torch"},
        lineage=Lineage(job_id="job-1", dataset="digits", dataset_version=2, hyperparameters={"lr": "0.1"}),
        precision="fp32",
    )


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'registry.db'}")
    upgrade(engine, MIGRATIONS)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine: Engine) -> RegistryStore:
    return RegistryStore(engine)


def test_the_migration_creates_exactly_the_orm_schema(engine: Engine) -> None:
    assert set(inspect(engine).get_table_names()) >= {
        "models",
        "versions",
        "aliases",
        "datasets",
        "dataset_versions",
    }
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": "registry_alembic_version"})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []


def test_upgrade_twice_is_a_no_op(engine: Engine) -> None:
    upgrade(engine, MIGRATIONS)


def test_models_are_scoped_by_tenant(store: RegistryStore) -> None:
    store.create_model("a", "digits", "mine", {"team": "x"})
    store.create_model("b", "digits", "theirs", {})
    with pytest.raises(AlreadyExists):
        store.create_model("a", "digits", "", {})
    assert store.get_model("a", "digits").description == "mine"
    assert store.get_model("b", "digits").description == "theirs"
    with pytest.raises(NotFound):
        store.get_model("c", "digits")
    assert [m.name for m in store.list_models("a", "", 10)] == ["digits"]


def test_versions_round_trip_and_number_per_model(store: RegistryStore) -> None:
    store.create_model("a", "m1", "", {})
    store.create_model("a", "m2", "", {})
    first = store.add_version("a", "m1", new_version())
    assert (first.version, store.add_version("a", "m1", new_version()).version) == (1, 2)
    assert store.add_version("a", "m2", new_version()).version == 1
    assert first.lineage == new_version().lineage
    assert first.metrics == {"accuracy": 0.9} and first.metadata == {"framework": "torch"}
    assert first.state is VersionState.READY and first.create_time.tzinfo is not None
    assert store.get_version("a", "m1", 1) == first
    assert store.get_model("a", "m1").latest_version == 2
    with pytest.raises(NotFound):
        store.add_version("b", "m1", new_version())
    with pytest.raises(NotFound):
        store.get_version("b", "m1", 1)


def test_concurrent_versions_get_distinct_consecutive_numbers(store: RegistryStore) -> None:
    store.create_model("a", "busy", "", {})
    with ThreadPoolExecutor(8) as pool:
        numbers = list(pool.map(lambda _: store.add_version("a", "busy", new_version()).version, range(24)))
    assert sorted(numbers) == list(range(1, 25))


def test_list_versions_pages_by_number(store: RegistryStore) -> None:
    store.create_model("a", "m", "", {})
    for _ in range(5):
        store.add_version("a", "m", new_version())
    assert [v.version for v in store.list_versions("a", "m", 0, 2)] == [1, 2]
    assert [v.version for v in store.list_versions("a", "m", 3, 10)] == [4, 5]


def test_aliases_follow_versions_and_block_archiving(store: RegistryStore) -> None:
    store.create_model("a", "m", "", {})
    store.add_version("a", "m", new_version())
    store.add_version("a", "m", new_version())
    store.set_alias("a", "m", "production", 1)
    store.set_alias("a", "m", "production", 2)
    assert store.resolve_alias("a", "m", "production").version == 2
    assert store.get_model("a", "m").aliases == {"production": 2}
    with pytest.raises(FailedPrecondition, match="production"):
        store.archive_version("a", "m", 2)
    assert store.archive_version("a", "m", 1).state is VersionState.ARCHIVED
    with pytest.raises(FailedPrecondition, match="archived"):
        store.set_alias("a", "m", "staging", 1)
    with pytest.raises(NotFound):
        store.set_alias("a", "m", "staging", 9)
    with pytest.raises(NotFound):
        store.resolve_alias("b", "m", "production")
    store.delete_alias("a", "m", "production")
    with pytest.raises(NotFound):
        store.delete_alias("a", "m", "production")


def test_delete_model_reports_digests_and_blob_use_spans_tenants(store: RegistryStore) -> None:
    store.create_model("a", "m", "", {})
    store.create_model("b", "m", "", {})
    store.add_version("a", "m", new_version("a" * 64))
    store.add_version("a", "m", new_version("b" * 64))
    store.add_version("b", "m", new_version("b" * 64))
    store.set_alias("a", "m", "production", 1)
    assert store.delete_model("a", "m") == {"a" * 64, "b" * 64}
    with pytest.raises(NotFound):
        store.get_model("a", "m")
    assert not store.blob_in_use("a" * 64)
    assert store.blob_in_use("b" * 64)  # tenant b still has it
    store.create_model("a", "m", "", {})
    assert store.add_version("a", "m", new_version()).version == 1


def test_datasets_number_versions_per_dataset(store: RegistryStore) -> None:
    store.create_dataset("a", "digits", "", DatasetFormat.NPZ, "")
    with pytest.raises(AlreadyExists):
        store.create_dataset("a", "digits", "", DatasetFormat.NPZ, "")
    assert store.add_dataset_version("a", "digits", "c" * 64, 5).version == 1
    assert store.add_dataset_version("a", "digits", "d" * 64, 6).version == 2
    assert store.blob_in_use("c" * 64)
    assert store.get_dataset("a", "digits").latest_version == 2
    assert store.get_dataset_version("a", "digits", 2).sha256 == "d" * 64
    assert [v.version for v in store.list_dataset_versions("a", "digits", 1, 10)] == [2]
    with pytest.raises(NotFound):
        store.get_dataset_version("b", "digits", 1)
    with pytest.raises(NotFound):
        store.add_dataset_version("b", "digits", "c" * 64, 5)
