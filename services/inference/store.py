"""The deployments table: the desired state that Triton is reconciled to. Every query is scoped
by tenant, except `all()`, which the reconciler uses to see the whole table."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from maas.common.v1 import common_pb2
from maas.tiers import FP32, tier_of_precision
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Engine,
    Float,
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
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError

from services.common.errors import AlreadyExists
from services.common.validation import Page

LOADING, READY, FAILED = "LOADING", "READY", "FAILED"
# No node has room for the replicas the deployment needs; its message says what is short.
PENDING = "PENDING"
# min_replicas 0 and idle: nothing is loaded until a request wakes it.
SCALED_TO_ZERO = "SCALED_TO_ZERO"

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
    # The canary: a second version answering canary_weight percent of the requests.
    Column("canary_version", BigInteger, nullable=True),
    Column("canary_weight", Integer, nullable=True),
    Column("canary_max_error_rate", Float, nullable=True),
    Column("canary_state", String(16), nullable=True),
    Column("canary_message", Text, nullable=True),
    Column("canary_triton_model", String(64), nullable=True),
    Column("canary_sha256", String(64), nullable=True),
    Column("canary_format", String(16), nullable=True),
    # What the served version answers (PREDICT, GENERATE or EMBED) and its precision tag, from
    # the version when it was resolved; runner_metadata holds the version's metadata the runner
    # needs (JSON), e.g. a language model's vocabulary.
    Column("task", String(16), nullable=False, server_default="PREDICT"),
    Column("precision", String(16), nullable=False, server_default=""),
    Column("runner_metadata", Text, nullable=False, server_default="{}"),
    # Longest one request may run in the model, in seconds; 0: the service's default.
    Column("execution_limit_seconds", Integer, nullable=False, server_default="0"),
    # Size of the served version's artifact, which the tenant's memory cap counts.
    Column("artifact_bytes", BigInteger, nullable=False, server_default="0"),
    # Replicas: the bounds the autoscaler keeps to, the count it wants now, and its target of
    # requests in flight per replica (0: the service's default).
    Column("min_replicas", Integer, nullable=False, server_default="1"),
    Column("max_replicas", Integer, nullable=False, server_default="1"),
    Column("desired_replicas", Integer, nullable=False, server_default="1"),
    Column("target_in_flight", Integer, nullable=False, server_default="0"),
    # The price tier of the served version and of the canary's (fp32, fp16, int8, distilled).
    Column("tier", String(32), nullable=False, server_default=""),
    Column("canary_tier", String(32), nullable=True),
    UniqueConstraint("tenant", "name", name="uq_deployments_tenant_name"),
    UniqueConstraint("triton_model", name="uq_deployments_triton_model"),
)

# Replica-seconds each tenant's deployments held READY, per UTC day and tier (billed per replica-hour).
replica_usage = Table(
    "replica_usage",
    metadata,
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("tenant", String(63), primary_key=True),
    Column("deployment", String(63), primary_key=True),
    Column("tier", String(32), primary_key=True),
    Column("replica_seconds", BigInteger, nullable=False),
)

# The Triton servers replicas are placed on, as the service last saw them.
nodes = Table(
    "nodes",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("address", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("model_slots", Integer, nullable=False),
    Column("memory_mb", BigInteger, nullable=False),
    Column("gpus", Integer, nullable=False),
    Column("message", Text, nullable=False),
    Column("last_contact", DateTime(timezone=True), nullable=True),
)

# The autoscaler's decisions, with their reasons.
scaling_events = Table(
    "scaling_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("deployment_id", String(32), nullable=False, index=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("from_replicas", Integer, nullable=False),
    Column("to_replicas", Integer, nullable=False),
    Column("reason", Text, nullable=False),
)


@dataclass(frozen=True)
class Canary:
    """A second version of the deployment's model, served beside it to weight percent of requests."""

    version: int
    weight: int  # percent, 1 to 99
    max_error_rate: float  # 0: never roll back on its own
    state: str  # LOADING, READY or FAILED
    message: str
    triton_model: str
    sha256: str
    format: str
    tier: str = ""  # its version's price tier

    def replace(self, **changes) -> Canary:
        return dataclasses.replace(self, **changes)


CANARY_COLUMNS = {
    "version": "canary_version",
    "weight": "canary_weight",
    "max_error_rate": "canary_max_error_rate",
    "state": "canary_state",
    "message": "canary_message",
    "triton_model": "canary_triton_model",
    "sha256": "canary_sha256",
    "format": "canary_format",
    "tier": "canary_tier",
}


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
    canary: Canary | None = None
    task: str = "PREDICT"  # PREDICT, GENERATE or EMBED
    precision: str = ""
    runner_metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    execution_limit_seconds: int = 0  # 0: the service's default
    artifact_bytes: int = 0
    min_replicas: int = 1
    max_replicas: int = 1
    desired_replicas: int = 1  # what the autoscaler wants now, within the bounds
    target_in_flight: int = 0  # 0: the service's default
    tier: str = ""  # the served version's price tier: fp32, fp16, int8 or distilled

    def replace(self, **changes) -> Deployment:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: str
    state: str  # READY, DRAINING or DOWN
    model_slots: int
    memory_mb: int
    gpus: int
    message: str
    last_contact: datetime | None


@dataclass(frozen=True)
class ReplicaUsage:
    """Replica-seconds one deployment's replicas of one tier held READY on one UTC day."""

    day: str  # YYYY-MM-DD
    tenant: str
    deployment: str  # its name
    tier: str
    replica_seconds: int


@dataclass(frozen=True)
class ScalingEvent:
    deployment_id: str
    time: datetime
    from_replicas: int
    to_replicas: int
    reason: str


def _row_values(deployment: Deployment) -> dict:
    values = {field.name: getattr(deployment, field.name) for field in dataclasses.fields(deployment)}
    values["signature"] = deployment.signature.SerializeToString(deterministic=True)
    values["runner_metadata"] = json.dumps(deployment.runner_metadata, sort_keys=True)
    canary = values.pop("canary")
    for field, column in CANARY_COLUMNS.items():
        values[column] = getattr(canary, field) if canary else None
    return values


def _deployment(row) -> Deployment:
    values = dict(row._mapping)
    canary = {field: values.pop(column) for field, column in CANARY_COLUMNS.items()}
    # A row written before tiers existed: its precision's tier; its canary's precision is not kept.
    values["tier"] = values["tier"] or tier_of_precision(values["precision"])
    if canary["version"] is not None:
        values["canary"] = Canary(**{**canary, "tier": canary["tier"] or FP32})
    values["signature"] = common_pb2.Signature.FromString(values["signature"])
    values["runner_metadata"] = json.loads(values["runner_metadata"])
    for key in ("create_time", "update_time"):
        values[key] = _utc(values[key])
    return Deployment(**values)


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite keeps no zone; we always write UTC
        return value.replace(tzinfo=UTC)
    return value


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

    def of_tenant(self, tenant: str) -> list[Deployment]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(deployments).where(deployments.c.tenant == tenant)).all()
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

    def set_canary_state(
        self, deployment_id: str, triton_model: str, state: str, message: str
    ) -> Deployment | None:
        """Record a canary load's outcome; None when that canary is gone meanwhile."""
        return self._update_canary(deployment_id, triton_model, canary_state=state, canary_message=message)

    def set_canary_weight(
        self, deployment_id: str, triton_model: str, weight: int, max_error_rate: float
    ) -> Deployment | None:
        """Change a canary's share and error threshold only, leaving its state to its load (a
        whole-row save of a copy read before the load ended would put LOADING back); None when
        that canary is gone meanwhile."""
        return self._update_canary(
            deployment_id, triton_model, canary_weight=weight, canary_max_error_rate=max_error_rate
        )

    def _update_canary(self, deployment_id: str, triton_model: str, **columns: object) -> Deployment | None:
        """Set these canary columns of the deployment if `triton_model` is still its canary; the
        row as it then is, or None."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(deployments)
                .where(deployments.c.id == deployment_id, deployments.c.canary_triton_model == triton_model)
                .values(**columns, update_time=now())
            )
            if result.rowcount != 1:
                return None
            row = connection.execute(select(deployments).where(deployments.c.id == deployment_id)).first()
        return _deployment(row) if row else None

    def set_desired_replicas(self, deployment_id: str, replicas: int, event: ScalingEvent) -> Deployment | None:
        """Record an autoscaling decision with its reason; None when the deployment is gone."""
        with self.engine.begin() as connection:
            result = connection.execute(
                update(deployments).where(deployments.c.id == deployment_id).values(desired_replicas=replicas)
            )
            if result.rowcount != 1:
                return None
            connection.execute(insert(scaling_events).values(**dataclasses.asdict(event)))
            row = connection.execute(select(deployments).where(deployments.c.id == deployment_id)).first()
        return _deployment(row) if row else None

    def scaling_events(self, deployment_id: str, limit: int = 10) -> list[ScalingEvent]:
        """The latest decisions, newest first."""
        query = (
            select(scaling_events)
            .where(scaling_events.c.deployment_id == deployment_id)
            .order_by(scaling_events.c.id.desc())
            .limit(limit)
        )
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [
            ScalingEvent(row.deployment_id, _utc(row.time), row.from_replicas, row.to_replicas, row.reason)  # type: ignore[arg-type]
            for row in rows
        ]

    def delete(self, tenant: str, name: str) -> Deployment | None:
        with self.engine.begin() as connection:
            row = connection.execute(
                select(deployments).where(deployments.c.tenant == tenant, deployments.c.name == name)
            ).first()
            if row is None:
                return None
            connection.execute(delete(deployments).where(deployments.c.id == row.id))
            connection.execute(delete(scaling_events).where(scaling_events.c.deployment_id == row.id))
        return _deployment(row)


class NodeStore:
    """The nodes table: written when a node's state changes and on each contact round."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def save(self, node: NodeRecord) -> None:
        values = dataclasses.asdict(node)
        with self.engine.begin() as connection:
            result = connection.execute(update(nodes).where(nodes.c.name == node.name).values(**values))
            if result.rowcount == 0:
                connection.execute(insert(nodes).values(**values))

    def all(self) -> list[NodeRecord]:
        with self.engine.connect() as connection:
            rows = connection.execute(select(nodes).order_by(nodes.c.name)).all()
        return [NodeRecord(**{**row._mapping, "last_contact": _utc(row.last_contact)}) for row in rows]

    def remove_except(self, names: set[str]) -> None:
        """Forget nodes no longer configured."""
        with self.engine.begin() as connection:
            connection.execute(delete(nodes).where(nodes.c.name.not_in(names)))


class ReplicaUsageStore:
    """The replica_usage table: the leader adds to it, billing reads it."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def add(self, rows: list[ReplicaUsage]) -> None:
        """Adds each row's replica-seconds to its (day, tenant, deployment, tier), in one transaction."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        with self.engine.begin() as connection:
            for row in rows:
                upsert = dialect.insert(replica_usage).values(**dataclasses.asdict(row))
                connection.execute(
                    upsert.on_conflict_do_update(
                        index_elements=["day", "tenant", "deployment", "tier"],
                        set_={"replica_seconds": replica_usage.c.replica_seconds + upsert.excluded.replica_seconds},
                    )
                )

    def of_tenant(self, tenant: str, first_day: str, last_day: str) -> list[ReplicaUsage]:
        """The tenant's rows between two UTC days (inclusive), by day, deployment and tier."""
        query = (
            select(replica_usage)
            .where(replica_usage.c.tenant == tenant, replica_usage.c.day.between(first_day, last_day))
            .order_by(replica_usage.c.day, replica_usage.c.deployment, replica_usage.c.tier)
        )
        with self.engine.connect() as connection:
            return [ReplicaUsage(**row._mapping) for row in connection.execute(query)]
