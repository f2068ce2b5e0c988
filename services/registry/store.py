"""What the registry keeps in SQL: models, versions, aliases, datasets and dataset versions.

Synchronous SQLAlchemy 2 sessions (the service calls them through `asyncio.to_thread`). Every
query is scoped by tenant, except `blob_in_use` and the blob data keys: blobs are
content-addressed and shared by all.
The schema comes from migrations/, never from `metadata.create_all`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    case,
    delete,
    exists,
    false,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


class ArtifactFormat(StrEnum):
    TORCHSCRIPT = "TORCHSCRIPT"
    ONNX = "ONNX"
    SAFETENSORS = "SAFETENSORS"  # a Hugging Face language model packed by maas.hf_format


class VersionState(StrEnum):
    READY = "READY"
    ARCHIVED = "ARCHIVED"


class DatasetFormat(StrEnum):
    NPZ = "NPZ"
    CSV = "CSV"


@dataclass(frozen=True)
class Lineage:
    job_id: str = ""
    dataset: str = ""
    dataset_version: int = 0
    parent_version: int = 0
    hyperparameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRecord:
    name: str
    description: str
    labels: dict[str, str]
    latest_version: int
    aliases: dict[str, int]
    create_time: datetime
    no_download: bool = False  # only an admin may download its versions


@dataclass(frozen=True)
class NewVersion:
    """A version whose bytes are committed to the blob store, about to become visible."""

    format: ArtifactFormat
    signature: bytes  # a serialized maas.common.v1.Signature
    sha256: str
    size_bytes: int
    metrics: dict[str, float]
    metadata: dict[str, str]
    lineage: Lineage
    precision: str


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: int
    format: ArtifactFormat
    signature: bytes
    sha256: str
    size_bytes: int
    state: VersionState
    metrics: dict[str, float]
    metadata: dict[str, str]
    lineage: Lineage
    precision: str
    create_time: datetime


@dataclass(frozen=True)
class AliasRecord:
    model: str
    name: str
    version: int


@dataclass(frozen=True)
class DatasetRecord:
    name: str
    description: str
    format: DatasetFormat
    target_column: str
    latest_version: int
    create_time: datetime


@dataclass(frozen=True)
class DatasetVersionRecord:
    dataset: str
    version: int
    sha256: str
    size_bytes: int
    create_time: datetime


@dataclass(frozen=True)
class StorageDay:
    """The bytes a tenant stored on a UTC day."""

    day: str  # YYYY-MM-DD
    bytes: int


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_models_tenant_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    latest_version: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Only an admin may download the weights of a model marked so.
    no_download: Mapped[bool] = mapped_column(Boolean, server_default=false())


class VersionRow(Base):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_versions_model_version"),
        Index("ix_versions_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    # "metadata" is reserved on declarative classes, hence the attribute name.
    meta: Mapped[dict[str, str]] = mapped_column("metadata", JSON)
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON)
    precision: Mapped[str] = mapped_column(String(32))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AliasRow(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_aliases_model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    version: Mapped[int] = mapped_column(Integer)


class DatasetRow(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("tenant", "name", name="uq_datasets_tenant_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(8))
    target_column: Mapped[str] = mapped_column(String(256))
    latest_version: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RetiredDatasetNumberRow(Base):
    """The last version number a deleted dataset gave, kept under its name: a dataset created
    again under that name numbers on from it, so that a name and a number always mean the same
    bytes (a retraining policy that saw version 3 sees the new dataset's first version as new)."""

    __tablename__ = "retired_dataset_numbers"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)


class DatasetVersionRow(Base):
    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_dataset_version"),
        Index("ix_dataset_versions_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BlobKeyRow(Base):
    """A blob's AES-256-GCM data key, wrapped by the key-encryption key `kek_id` names."""

    __tablename__ = "blob_keys"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(String(64))
    algorithm: Mapped[str] = mapped_column(String(32))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))


@dataclass(frozen=True)
class BlobKeyRecord:
    sha256: str
    wrapped_key: bytes
    kek_id: str
    algorithm: str


class StorageUsageRow(Base):
    """The bytes a tenant stored on a UTC day (the day's largest sample), billed per GB-month."""

    __tablename__ = "storage_usage"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _model_record(row: ModelRow, aliases: dict[str, int]) -> ModelRecord:
    return ModelRecord(
        name=row.name,
        description=row.description,
        labels=dict(row.labels),
        latest_version=row.latest_version,
        aliases=aliases,
        create_time=_utc(row.create_time),
        no_download=row.no_download,
    )


def _version_record(model: str, row: VersionRow) -> VersionRecord:
    return VersionRecord(
        model=model,
        version=row.version,
        format=ArtifactFormat(row.format),
        signature=row.signature,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        state=VersionState(row.state),
        metrics=dict(row.metrics),
        metadata=dict(row.meta),
        lineage=Lineage(**row.lineage),
        precision=row.precision,
        create_time=_utc(row.create_time),
    )


def _blob_key_record(row: BlobKeyRow) -> BlobKeyRecord:
    return BlobKeyRecord(sha256=row.sha256, wrapped_key=row.wrapped_key, kek_id=row.kek_id, algorithm=row.algorithm)


def _blob_key_row(record: BlobKeyRecord) -> BlobKeyRow:
    return BlobKeyRow(
        sha256=record.sha256,
        wrapped_key=record.wrapped_key,
        kek_id=record.kek_id,
        algorithm=record.algorithm,
        create_time=datetime.now(UTC),
    )


def _dataset_record(row: DatasetRow) -> DatasetRecord:
    return DatasetRecord(
        name=row.name,
        description=row.description,
        format=DatasetFormat(row.format),
        target_column=row.target_column,
        latest_version=row.latest_version,
        create_time=_utc(row.create_time),
    )


def _dataset_version_record(dataset: str, row: DatasetVersionRow) -> DatasetVersionRecord:
    return DatasetVersionRecord(
        dataset=dataset,
        version=row.version,
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        create_time=_utc(row.create_time),
    )


class RegistryStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # Models

    def create_model(
        self, tenant: str, name: str, description: str, labels: dict[str, str], no_download: bool = False
    ) -> ModelRecord:
        row = ModelRow(
            tenant=tenant,
            name=name,
            description=description,
            labels=labels,
            latest_version=0,
            create_time=datetime.now(UTC),
            no_download=no_download,
        )
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            raise AlreadyExists(f"model {name!r} already exists") from None
        return _model_record(row, {})

    def get_model(self, tenant: str, name: str) -> ModelRecord:
        with self._sessions() as session:
            row = self._model_row(session, tenant, name)
            return _model_record(row, self._aliases_of(session, tenant, [row.id])[row.id])

    def list_models(self, tenant: str, after: str, limit: int) -> list[ModelRecord]:
        with self._sessions() as session:
            rows = session.scalars(
                select(ModelRow)
                .where(ModelRow.tenant == tenant, ModelRow.name > after)
                .order_by(ModelRow.name)
                .limit(limit)
            ).all()
            aliases = self._aliases_of(session, tenant, [row.id for row in rows])
            return [_model_record(row, aliases[row.id]) for row in rows]

    def update_model(
        self, tenant: str, name: str, changes: dict[str, Any], *, unless_no_download: bool = False
    ) -> ModelRecord | None:
        """Writes `changes` (column -> value) to the model and returns it. With
        `unless_no_download`, a model marked no-download is left as it is and None returned: the
        check and the write are one statement, so a mark set meanwhile is never lost."""
        with self._sessions.begin() as session:
            query = update(ModelRow).where(ModelRow.tenant == tenant, ModelRow.name == name)
            if unless_no_download:
                query = query.where(ModelRow.no_download == false())
            changed = session.execute(
                query.values(**changes).execution_options(synchronize_session=False)
            ).rowcount
            row = self._model_row(session, tenant, name)  # NotFound when there is no such model
            if not changed:
                return None
            return _model_record(row, self._aliases_of(session, tenant, [row.id])[row.id])

    def delete_model(self, tenant: str, name: str) -> set[str]:
        """Deletes the model, its versions and aliases; returns the sha256 of every deleted version."""
        with self._sessions.begin() as session:
            row = self._model_row(session, tenant, name)
            digests = set(
                session.scalars(
                    select(VersionRow.sha256).where(
                        VersionRow.tenant == tenant, VersionRow.model_id == row.id
                    )
                )
            )
            session.execute(delete(AliasRow).where(AliasRow.tenant == tenant, AliasRow.model_id == row.id))
            session.execute(
                delete(VersionRow).where(VersionRow.tenant == tenant, VersionRow.model_id == row.id)
            )
            session.execute(delete(ModelRow).where(ModelRow.tenant == tenant, ModelRow.id == row.id))
        return digests

    def blob_in_use(self, sha256: str) -> bool:
        """Whether any version or dataset version of any tenant still points at these bytes."""
        with self._sessions() as session:
            return bool(
                session.scalar(
                    select(
                        exists().where(VersionRow.sha256 == sha256)
                        | exists().where(DatasetVersionRow.sha256 == sha256)
                    )
                )
            )

    # Versions

    def add_version(self, tenant: str, model: str, new: NewVersion) -> VersionRecord:
        """Numbers and inserts a version. The counter bump is the transaction's first statement, so
        concurrent uploads queue on the model row (PostgreSQL) or the write lock (SQLite)."""
        with self._sessions.begin() as session:
            bumped = session.execute(
                update(ModelRow)
                .where(ModelRow.tenant == tenant, ModelRow.name == model)
                .values(latest_version=ModelRow.latest_version + 1)
                .returning(ModelRow.id, ModelRow.latest_version)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if bumped is None:
                raise NotFound(f"model {model!r} not found")
            row = VersionRow(
                tenant=tenant,
                model_id=bumped.id,
                version=bumped.latest_version,
                format=new.format.value,
                signature=new.signature,
                sha256=new.sha256,
                size_bytes=new.size_bytes,
                state=VersionState.READY.value,
                metrics=new.metrics,
                meta=new.metadata,
                lineage=asdict(new.lineage),
                precision=new.precision,
                create_time=datetime.now(UTC),
            )
            session.add(row)
        return _version_record(model, row)

    def get_version(self, tenant: str, model: str, version: int) -> VersionRecord:
        with self._sessions() as session:
            model_row = self._model_row(session, tenant, model)
            return _version_record(model, self._version_row(session, tenant, model_row, version))

    def resolve_alias(self, tenant: str, model: str, alias: str) -> VersionRecord:
        with self._sessions() as session:
            model_row = self._model_row(session, tenant, model)
            number = session.scalar(
                select(AliasRow.version).where(
                    AliasRow.tenant == tenant, AliasRow.model_id == model_row.id, AliasRow.name == alias
                )
            )
            if number is None:
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            return _version_record(model, self._version_row(session, tenant, model_row, number))

    def list_versions(self, tenant: str, model: str, after: int, limit: int) -> list[VersionRecord]:
        with self._sessions() as session:
            model_row = self._model_row(session, tenant, model)
            rows = session.scalars(
                select(VersionRow)
                .where(
                    VersionRow.tenant == tenant,
                    VersionRow.model_id == model_row.id,
                    VersionRow.version > after,
                )
                .order_by(VersionRow.version)
                .limit(limit)
            ).all()
            return [_version_record(model, row) for row in rows]

    def archive_version(self, tenant: str, model: str, version: int) -> VersionRecord:
        with self._sessions.begin() as session:
            model_row = self._model_row(session, tenant, model)
            row = self._version_row(session, tenant, model_row, version, for_update=True)
            aliases = session.scalars(
                select(AliasRow.name).where(
                    AliasRow.tenant == tenant, AliasRow.model_id == model_row.id, AliasRow.version == version
                )
            ).all()
            if aliases:
                # Aliases always point at deployable versions: deployments follow them.
                raise FailedPrecondition(
                    f"version {version} of model {model!r} is aliased as {sorted(aliases)}: "
                    "point those aliases at another version or delete them first"
                )
            row.state = VersionState.ARCHIVED.value
        return _version_record(model, row)

    def update_version_metadata(
        self, tenant: str, model: str, version: int, entries: dict[str, str], max_entries: int
    ) -> VersionRecord:
        """Merge `entries` into the version's metadata (an empty value removes its key), in one
        transaction so that concurrent updates of other keys are not lost."""
        with self._sessions.begin() as session:
            model_row = self._model_row(session, tenant, model)
            row = self._version_row(session, tenant, model_row, version, for_update=True)
            merged = {**row.meta, **entries}
            merged = {key: value for key, value in merged.items() if value}
            if len(merged) > max_entries:
                raise InvalidArgument(
                    f"version {version} of model {model!r} would have {len(merged)} metadata entries; "
                    f"at most {max_entries} are allowed: remove some (an empty value removes a key)"
                )
            row.meta = merged
        return _version_record(model, row)

    def set_alias(self, tenant: str, model: str, alias: str, version: int) -> AliasRecord:
        try:
            return self._set_alias_once(tenant, model, alias, version)
        except IntegrityError:
            # Another caller created the same alias at that moment: now it exists, update it.
            return self._set_alias_once(tenant, model, alias, version)

    def _set_alias_once(self, tenant: str, model: str, alias: str, version: int) -> AliasRecord:
        with self._sessions.begin() as session:
            model_row = self._model_row(session, tenant, model)
            target = self._version_row(session, tenant, model_row, version, for_update=True)
            if target.state == VersionState.ARCHIVED:
                raise FailedPrecondition(
                    f"version {version} of model {model!r} is archived and cannot be aliased"
                )
            row = session.scalar(
                select(AliasRow).where(
                    AliasRow.tenant == tenant, AliasRow.model_id == model_row.id, AliasRow.name == alias
                )
            )
            if row is None:
                session.add(AliasRow(tenant=tenant, model_id=model_row.id, name=alias, version=version))
            else:
                row.version = version
        return AliasRecord(model=model, name=alias, version=version)

    def delete_alias(self, tenant: str, model: str, alias: str) -> None:
        with self._sessions.begin() as session:
            model_row = self._model_row(session, tenant, model)
            deleted = session.execute(
                delete(AliasRow).where(
                    AliasRow.tenant == tenant, AliasRow.model_id == model_row.id, AliasRow.name == alias
                )
            )
            if not deleted.rowcount:
                raise NotFound(f"model {model!r} has no alias {alias!r}")

    # Datasets

    def create_dataset(
        self, tenant: str, name: str, description: str, format: DatasetFormat, target_column: str
    ) -> DatasetRecord:
        row = DatasetRow(
            tenant=tenant,
            name=name,
            description=description,
            format=format.value,
            target_column=target_column,
            latest_version=0,
            create_time=datetime.now(UTC),
        )
        try:
            with self._sessions.begin() as session:
                session.add(row)
        except IntegrityError:
            raise AlreadyExists(f"dataset {name!r} already exists") from None
        return _dataset_record(row)

    def delete_dataset(self, tenant: str, name: str) -> set[str]:
        """Deletes the dataset and its versions; returns the sha256 of every deleted version."""
        with self._sessions.begin() as session:
            row = self._dataset_row(session, tenant, name)
            digests = set(
                session.scalars(
                    select(DatasetVersionRow.sha256).where(
                        DatasetVersionRow.tenant == tenant, DatasetVersionRow.dataset_id == row.id
                    )
                )
            )
            session.execute(
                delete(DatasetVersionRow).where(
                    DatasetVersionRow.tenant == tenant, DatasetVersionRow.dataset_id == row.id
                )
            )
            deleted = session.execute(delete(DatasetRow).where(DatasetRow.tenant == tenant, DatasetRow.id == row.id))
            if not deleted.rowcount:  # a concurrent delete took it first: only one records its number
                raise NotFound(f"dataset {name!r} not found")
            retired = session.get(RetiredDatasetNumberRow, (tenant, name))
            if retired is None:
                session.add(RetiredDatasetNumberRow(tenant=tenant, name=name, last_version=row.latest_version))
            else:  # a name deleted before: its versions numbered on from that one's
                retired.last_version = max(retired.last_version, row.latest_version)
        return digests

    def get_dataset(self, tenant: str, name: str) -> DatasetRecord:
        with self._sessions() as session:
            return _dataset_record(self._dataset_row(session, tenant, name))

    def list_datasets(self, tenant: str, after: str, limit: int) -> list[DatasetRecord]:
        with self._sessions() as session:
            rows = session.scalars(
                select(DatasetRow)
                .where(DatasetRow.tenant == tenant, DatasetRow.name > after)
                .order_by(DatasetRow.name)
                .limit(limit)
            ).all()
            return [_dataset_record(row) for row in rows]

    def add_dataset_version(
        self, tenant: str, dataset: str, sha256: str, size_bytes: int
    ) -> DatasetVersionRecord:
        with self._sessions.begin() as session:
            retired = session.get(RetiredDatasetNumberRow, (tenant, dataset))
            floor = retired.last_version if retired else 0
            bumped = session.execute(
                update(DatasetRow)
                .where(DatasetRow.tenant == tenant, DatasetRow.name == dataset)
                .values(
                    latest_version=case(
                        (DatasetRow.latest_version >= floor, DatasetRow.latest_version), else_=floor
                    ) + 1
                )
                .returning(DatasetRow.id, DatasetRow.latest_version)
                .execution_options(synchronize_session=False)
            ).one_or_none()
            if bumped is None:
                raise NotFound(f"dataset {dataset!r} not found")
            row = DatasetVersionRow(
                tenant=tenant,
                dataset_id=bumped.id,
                version=bumped.latest_version,
                sha256=sha256,
                size_bytes=size_bytes,
                create_time=datetime.now(UTC),
            )
            session.add(row)
        return _dataset_version_record(dataset, row)

    def get_dataset_version(self, tenant: str, dataset: str, version: int) -> DatasetVersionRecord:
        with self._sessions() as session:
            dataset_row = self._dataset_row(session, tenant, dataset)
            row = session.scalar(
                select(DatasetVersionRow).where(
                    DatasetVersionRow.tenant == tenant,
                    DatasetVersionRow.dataset_id == dataset_row.id,
                    DatasetVersionRow.version == version,
                )
            )
            if row is None:
                raise NotFound(f"dataset {dataset!r} has no version {version}")
            return _dataset_version_record(dataset, row)

    def list_dataset_versions(
        self, tenant: str, dataset: str, after: int, limit: int
    ) -> list[DatasetVersionRecord]:
        with self._sessions() as session:
            dataset_row = self._dataset_row(session, tenant, dataset)
            rows = session.scalars(
                select(DatasetVersionRow)
                .where(
                    DatasetVersionRow.tenant == tenant,
                    DatasetVersionRow.dataset_id == dataset_row.id,
                    DatasetVersionRow.version > after,
                )
                .order_by(DatasetVersionRow.version)
                .limit(limit)
            ).all()
            return [_dataset_version_record(dataset, row) for row in rows]

    # Blob data keys (not scoped by tenant: like blobs, they belong to the bytes)

    def blob_key(self, sha256: str) -> BlobKeyRecord | None:
        with self._sessions() as session:
            row = session.get(BlobKeyRow, sha256)
            return None if row is None else _blob_key_record(row)

    def add_blob_key_unless_present(self, new: BlobKeyRecord) -> BlobKeyRecord:
        """Store `new` unless the blob has a key already; return the blob's key either way."""
        try:
            with self._sessions.begin() as session:
                row = session.get(BlobKeyRow, new.sha256)
                if row is not None:
                    return _blob_key_record(row)
                session.add(_blob_key_row(new))
            return new
        except IntegrityError:
            # Another upload of the same bytes stored one at that moment: that one holds.
            existing = self.blob_key(new.sha256)
            if existing is None:
                raise
            return existing

    def put_blob_key(self, new: BlobKeyRecord) -> None:
        """Store `new` as the blob's key, replacing any other."""
        try:
            self._put_blob_key_once(new)
        except IntegrityError:
            # Another writer inserted one between our delete and insert: replace that one.
            self._put_blob_key_once(new)

    def _put_blob_key_once(self, new: BlobKeyRecord) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(BlobKeyRow).where(BlobKeyRow.sha256 == new.sha256))
            session.add(_blob_key_row(new))

    def delete_blob_key(self, sha256: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(BlobKeyRow).where(BlobKeyRow.sha256 == sha256))

    def has_blob_keys(self) -> bool:
        with self._sessions() as session:
            return session.scalar(select(BlobKeyRow.sha256).limit(1)) is not None

    def kek_ids(self) -> set[str]:
        """Every KEK some data key is wrapped by."""
        with self._sessions() as session:
            return set(session.scalars(select(BlobKeyRow.kek_id).distinct()))

    def blob_keys_not_wrapped_by(self, kek_id: str, limit: int) -> list[BlobKeyRecord]:
        with self._sessions() as session:
            rows = session.scalars(
                select(BlobKeyRow).where(BlobKeyRow.kek_id != kek_id).order_by(BlobKeyRow.sha256).limit(limit)
            ).all()
            return [_blob_key_record(row) for row in rows]

    def rewrap_blob_keys(self, old: list[BlobKeyRecord], new: list[BlobKeyRecord]) -> int:
        """Replace each key of `old` by the same blob's in `new`, in one transaction, where the row
        is still as `old` read it (a key deleted or replaced meanwhile is left alone). Returns how
        many were replaced."""
        replaced = 0
        with self._sessions.begin() as session:
            for before, after in zip(old, new, strict=True):
                result = session.execute(
                    update(BlobKeyRow)
                    .where(BlobKeyRow.sha256 == before.sha256, BlobKeyRow.wrapped_key == before.wrapped_key)
                    .values(wrapped_key=after.wrapped_key, kek_id=after.kek_id)
                    .execution_options(synchronize_session=False)
                )
                replaced += result.rowcount
        return replaced

    # Storage usage (billing)

    def sample_storage(self, day: str) -> dict[str, int]:
        """Records what each tenant stores now (its versions', archived ones included, and its
        dataset versions' sizes: a blob two versions share counts for each) as `day`'s sample,
        keeping the day's largest. A tenant whose latest sample was above zero and who stores
        nothing now is sampled at zero, so that carrying samples forward never bills deleted
        bytes. Returns the samples written."""
        with self._sessions.begin() as session:
            stored: Counter[str] = Counter()
            for table in (VersionRow, DatasetVersionRow):
                sizes = select(table.tenant, func.sum(table.size_bytes)).group_by(table.tenant)
                for tenant, size in session.execute(sizes):
                    stored[tenant] += int(size)
            latest_days = (
                select(StorageUsageRow.tenant, func.max(StorageUsageRow.day).label("day"))
                .group_by(StorageUsageRow.tenant)
                .subquery()
            )
            last_sampled_above_zero = session.scalars(
                select(StorageUsageRow.tenant)
                .join(
                    latest_days,
                    (StorageUsageRow.tenant == latest_days.c.tenant) & (StorageUsageRow.day == latest_days.c.day),
                )
                .where(StorageUsageRow.bytes > 0)
            )
            samples = dict.fromkeys(last_sampled_above_zero, 0) | dict(stored)
            dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            for tenant, size in samples.items():
                upsert = dialect.insert(StorageUsageRow).values(day=day, tenant=tenant, bytes=size)
                larger = case((upsert.excluded.bytes > StorageUsageRow.bytes, upsert.excluded.bytes), else_=StorageUsageRow.bytes)
                session.execute(upsert.on_conflict_do_update(index_elements=["day", "tenant"], set_={"bytes": larger}))
        return samples

    def storage_days(self, tenant: str, first_day: str, last_day: str) -> list[StorageDay]:
        """The tenant's samples from first_day to last_day (inclusive), oldest first, preceded by
        its latest sample before first_day when there is one (what the range's first days carry)."""
        with self._sessions() as session:
            before = session.scalar(
                select(StorageUsageRow)
                .where(StorageUsageRow.tenant == tenant, StorageUsageRow.day < first_day)
                .order_by(StorageUsageRow.day.desc())
                .limit(1)
            )
            within = session.scalars(
                select(StorageUsageRow)
                .where(StorageUsageRow.tenant == tenant, StorageUsageRow.day.between(first_day, last_day))
                .order_by(StorageUsageRow.day)
            ).all()
            return [StorageDay(row.day, row.bytes) for row in [*([before] if before else []), *within]]

    # Lookups shared by the methods above

    @staticmethod
    def _model_row(session: Session, tenant: str, name: str) -> ModelRow:
        row = session.scalar(select(ModelRow).where(ModelRow.tenant == tenant, ModelRow.name == name))
        if row is None:
            raise NotFound(f"model {name!r} not found")
        return row

    @staticmethod
    def _version_row(
        session: Session, tenant: str, model: ModelRow, version: int, *, for_update: bool = False
    ) -> VersionRow:
        query = select(VersionRow).where(
            VersionRow.tenant == tenant, VersionRow.model_id == model.id, VersionRow.version == version
        )
        row = session.scalar(query.with_for_update() if for_update else query)
        if row is None:
            raise NotFound(f"model {model.name!r} has no version {version}")
        return row

    @staticmethod
    def _aliases_of(session: Session, tenant: str, model_ids: list[int]) -> dict[int, dict[str, int]]:
        aliases: dict[int, dict[str, int]] = {model_id: {} for model_id in model_ids}
        if model_ids:
            rows = session.execute(
                select(AliasRow.model_id, AliasRow.name, AliasRow.version)
                .where(AliasRow.tenant == tenant, AliasRow.model_id.in_(model_ids))
                .order_by(AliasRow.name)
            )
            for model_id, name, version in rows:
                aliases[model_id][name] = version
        return aliases

    @staticmethod
    def _dataset_row(session: Session, tenant: str, name: str) -> DatasetRow:
        row = session.scalar(select(DatasetRow).where(DatasetRow.tenant == tenant, DatasetRow.name == name))
        if row is None:
            raise NotFound(f"dataset {name!r} not found")
        return row
