"""The deployments table: the desired state that Triton is reconciled to. Every query is scoped
by tenant, except `all()`, which the reconciler uses to see the whole table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

from maas.common.v1 import common_pb2
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from services.common.errors import AlreadyExists
from services.common.validation import Page

LOADING, READY, FAILED = "LOADING", "READY", "FAILED"

metadata = MetaData()

deployments = Table(
    "deployments",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("name", String(63), nullable=False),
    Column("model", String(63), nullable=False),
    # The target: a fixed version, or an alias resolved when the deployment is created or updated.
    Column("version", BigInteger, nullable=True),
    Column("alias", String(63), nullable=True),
    Column("resolved_version", BigInteger, nullable=False),
    Column("instances", Integer, nullable=False),
    Column("max_batch_size", Integer, nullable=False),
    Column("device", String(8), nullable=False),
    Column("cacheable", Boolean, nullable=False),
    Column("state", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("triton_model", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("format", String(16), nullable=False),
    # A serialized maas.common.v1.Signature.
    Column("signature", LargeBinary, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("tenant", "name", name="uq_deployments_tenant_name"),
    UniqueConstraint("triton_model", name="uq_deployments_triton_model"),
)


@dataclass(frozen=True)
class Deployment:
    id: str
    tenant: str
    name: str
    model: str
    version: int | None
    alias: str | None
    resolved_version: int
    instances: int
    max_batch_size: int
    device: str  # AUTO, CPU or GPU
    cacheable: bool
    state: str  # LOADING, READY or FAILED
    message: str
    triton_model: str
    sha256: str
    format: str  # TORCHSCRIPT or ONNX
    signature: common_pb2.Signature
    create_time: datetime
    update_time: datetime

    def replace(self, **changes) -> Deployment:
        return dataclasses.replace(self, **changes)


def _row_values(deployment: Deployment) -> dict:
    values = dataclasses.asdict(deployment)
    values["signature"] = deployment.signature.SerializeToString(deterministic=True)
    return values


def _deployment(row) -> Deployment:
    values = dict(row._mapping)
    values["signature"] = common_pb2.Signature.FromString(values["signature"])
    for key in ("create_time", "update_time"):
        if values[key].tzinfo is None:  # SQLite keeps no zone; we always write UTC
            values[key] = values[key].replace(tzinfo=UTC)
    return Deployment(**values)


def now() -> datetime:
    return datetime.now(UTC)


class DeploymentStore:
    """Synchronous: async callers use asyncio.to_thread."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def create(self, deployment: Deployment) -> Deployment:
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(deployments).values(**_row_values(deployment)))
        except IntegrityError:
            raise AlreadyExists(f"deployment {deployment.name!r} already exists") from None
        return deployment

    def get(self, tenant: str, name: str) -> Deployment | None:
        with self.engine.connect() as connection:
            row = connection.execute(
                select(deployments).where(deployments.c.tenant == tenant, deployments.c.name == name)
            ).first()
        return _deployment(row) if row else None

    def list_page(self, tenant: str, page: Page) -> list[Deployment]:
        """One page ordered by name, plus one extra row when a next page exists."""
        query = select(deployments).where(deployments.c.tenant == tenant)
        if page.after:
            query = query.where(deployments.c.name > page.after)
        with self.engine.connect() as connection:
            rows = connection.execute(query.order_by(deployments.c.name).limit(page.size + 1)).all()
        return [_deployment(row) for row in rows]

    def all(self) -> list[Deployment]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(deployments).order_by(deployments.c.create_time)).all()
        return [_deployment(row) for row in rows]

    def save(self, deployment: Deployment) -> bool:
        """Overwrite the row; False when it was deleted meanwhile."""
        values = _row_values(deployment)
        for key in ("id", "tenant", "name", "create_time"):
            values.pop(key)
        with self.engine.begin() as connection:
            result = connection.execute(
                update(deployments).where(deployments.c.id == deployment.id).values(**values)
            )
        return result.rowcount == 1

    def set_state(self, deployment_id: str, state: str, message: str) -> Deployment | None:
        """Record a load's outcome; None when the deployment was deleted meanwhile."""
        with self.engine.begin() as connection:
            connection.execute(
                update(deployments)
                .where(deployments.c.id == deployment_id)
                .values(state=state, message=message, update_time=now())
            )
            row = connection.execute(select(deployments).where(deployments.c.id == deployment_id)).first()
        return _deployment(row) if row else None

    def delete(self, tenant: str, name: str) -> Deployment | None:
        with self.engine.begin() as connection:
            row = connection.execute(
                select(deployments).where(deployments.c.tenant == tenant, deployments.c.name == name)
            ).first()
            if row is None:
                return None
            connection.execute(delete(deployments).where(deployments.c.id == row.id))
        return _deployment(row)
