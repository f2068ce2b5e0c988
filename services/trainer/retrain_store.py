"""What the trainer keeps in SQL for retraining: policies, their runs and the runs' events.

Synchronous SQLAlchemy 2 sessions, called through `asyncio.to_thread`. Reads a caller asks for
are scoped by tenant; the retrain loop's own views (every policy, every active run) work on rows
it then addresses by key. A run starts by claiming its policy (`active_run`, a conditional
update), so two triggers, or two trainers, never start two runs of one policy. The schema comes
from migrations/0003.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    Text,
    delete,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from services.common.errors import NotFound
from services.trainer.store import Base, _utc


class Trigger(StrEnum):
    NEW_DATASET_VERSION = "NEW_DATASET_VERSION"
    SCHEDULE = "SCHEDULE"
    DRIFT = "DRIFT"


class Action(StrEnum):
    REGISTER = "REGISTER"
    ALIAS = "ALIAS"
    CANARY = "CANARY"


class RunState(StrEnum):
    TRAINING = "TRAINING"
    EVALUATING = "EVALUATING"
    ROLLING_OUT = "ROLLING_OUT"
    PROMOTED = "PROMOTED"
    REJECTED = "REJECTED"
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        return self in (RunState.PROMOTED, RunState.REJECTED, RunState.FAILED)


ACTIVE_RUN_STATES = (RunState.TRAINING, RunState.EVALUATING, RunState.ROLLING_OUT)


@dataclass(frozen=True)
class Policy:
    """A model's retraining policy. The settings as the caller sent them (0 and "" where unset)
    until `retrain.resolve_policy` fills the defaults; the rest the trainer keeps."""

    model: str
    trigger: Trigger | None
    dataset: str
    from_version: int = 0
    interval_seconds: int = 0
    deployment: str = ""
    metric: str = ""
    min_gain: float = 0.0
    action: Action = Action.REGISTER
    alias: str = ""
    canary_weight_percent: int = 0
    canary_window_seconds: int = 0
    canary_max_error_rate: float = 0.0
    drift_threshold: float = 0.0
    cooldown_seconds: int = 0
    # Kept by the trainer: from_version's training spec and task, and the policy's history.
    spec: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    tenant: str = ""
    create_time: datetime | None = None
    last_dataset_version: int = 0
    last_run_time: datetime | None = None
    active_run: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The settings a run keeps as its snapshot (JSON)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name in SNAPSHOT_FIELDS}
        out["trigger"] = self.trigger.value if self.trigger else ""
        out["action"] = self.action.value
        return out

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> Policy:
        return cls(**{**data, "trigger": Trigger(data["trigger"]), "action": Action(data["action"])})


SNAPSHOT_FIELDS = (
    "model", "trigger", "dataset", "from_version", "interval_seconds", "deployment", "metric", "min_gain", "action",
    "alias", "canary_weight_percent", "canary_window_seconds", "canary_max_error_rate", "drift_threshold",
    "cooldown_seconds", "spec", "task",
)


@dataclass(frozen=True)
class Run:
    id: str
    tenant: str
    model: str
    state: RunState
    reason: str
    dataset_version: int
    job_id: str
    policy: dict[str, Any]  # the Policy snapshot it runs by
    create_time: datetime
    candidate_version: int = 0
    serving_version: int = 0
    candidate_metric: float | None = None
    serving_metric: float | None = None
    samples: int = 0
    verdict: str = ""  # "accepted" or "rejected" once the evaluation is stored
    comparison: str = ""
    message: str = ""
    end_time: datetime | None = None
    canary_ready_time: datetime | None = None

    @property
    def settings(self) -> Policy:
        return Policy.from_snapshot(self.policy)


@dataclass(frozen=True)
class RetrainEvent:
    run_id: str
    time: datetime
    step: str  # triggered, training, trained, evaluated, rejected, registered, alias_moved, ...
    message: str


@dataclass(frozen=True)
class TenantEvent:
    """An event with its place in the log of every tenant's events (ids only grow)."""

    id: int
    tenant: str
    model: str
    event: RetrainEvent


class PolicyRow(Base):
    __tablename__ = "retrain_policies"

    tenant: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(63), primary_key=True)
    trigger: Mapped[str] = mapped_column(String(24))
    dataset: Mapped[str] = mapped_column(String(63))
    from_version: Mapped[int] = mapped_column(Integer)
    interval_seconds: Mapped[int] = mapped_column(BigInteger)
    deployment: Mapped[str] = mapped_column(String(63))
    metric: Mapped[str] = mapped_column(String(16))
    min_gain: Mapped[float] = mapped_column(Float)
    action: Mapped[str] = mapped_column(String(16))
    alias: Mapped[str] = mapped_column(String(63))
    canary_weight_percent: Mapped[int] = mapped_column(Integer)
    canary_window_seconds: Mapped[int] = mapped_column(BigInteger)
    canary_max_error_rate: Mapped[float] = mapped_column(Float)
    drift_threshold: Mapped[float] = mapped_column(Float)
    cooldown_seconds: Mapped[int] = mapped_column(BigInteger)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    task: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_dataset_version: Mapped[int] = mapped_column(Integer)
    last_run_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    active_run: Mapped[str] = mapped_column(String(40), server_default="")


class RunRow(Base):
    __tablename__ = "retrain_runs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    dataset_version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(String(40))
    candidate_version: Mapped[int] = mapped_column(Integer)
    serving_version: Mapped[int] = mapped_column(Integer)
    candidate_metric: Mapped[float | None] = mapped_column(Float, nullable=True)
    serving_metric: Mapped[float | None] = mapped_column(Float, nullable=True)
    samples: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(16))
    comparison: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    canary_ready_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class EventRow(Base):
    __tablename__ = "retrain_events"
    # Ids are never reused, not even those of a deleted policy's newest events (SQLite reuses
    # them without AUTOINCREMENT): the gateway's audit log copies events by id (migrations/0004).
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(63))
    run_id: Mapped[str] = mapped_column(String(40))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    step: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)


POLICY_COLUMNS = tuple(PolicyRow.__table__.columns.keys())
RUN_COLUMNS = tuple(RunRow.__table__.columns.keys())


def _policy(row: PolicyRow) -> Policy:
    values = {name: getattr(row, name) for name in POLICY_COLUMNS}
    return Policy(**{
        **values, "trigger": Trigger(row.trigger), "action": Action(row.action),
        "create_time": _utc(row.create_time), "last_run_time": _utc(row.last_run_time),
    })


def _run(row: RunRow) -> Run:
    values = {name: getattr(row, name) for name in RUN_COLUMNS}
    return Run(**{
        **values, "state": RunState(row.state), "create_time": _utc(row.create_time),
        "end_time": _utc(row.end_time), "canary_ready_time": _utc(row.canary_ready_time),
    })


def _event(row: EventRow) -> RetrainEvent:
    return RetrainEvent(row.run_id, _utc(row.time) or row.time, row.step, row.message)


def _policy_values(policy: Policy) -> dict[str, Any]:
    values = {name: getattr(policy, name) for name in POLICY_COLUMNS}
    values["trigger"] = policy.trigger.value if policy.trigger else ""
    values["action"] = policy.action.value
    return values


class RetrainStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    # Policies

    def put_policy(self, policy: Policy) -> Policy:
        """Insert or replace the tenant's policy for its model. A replaced policy keeps its
        history (creation time, last run, the run in progress) unless `policy` brings its own."""
        with self._sessions.begin() as session:
            row = session.get(PolicyRow, (policy.tenant, policy.model), with_for_update=True)
            if row is None:
                row = PolicyRow(**_policy_values(policy))
                session.add(row)
            else:
                kept = {"create_time": row.create_time, "last_run_time": row.last_run_time,
                        "active_run": row.active_run}
                for name, value in {**_policy_values(policy), **kept}.items():
                    setattr(row, name, value)
            session.flush()
            return _policy(row)

    def get_policy(self, tenant: str, model: str) -> Policy:
        with self._sessions() as session:
            row = session.get(PolicyRow, (tenant, model))
            if row is None:
                raise NotFound(
                    f"model {model!r} has no retraining policy: set one with `maas models retrain set {model} ...`"
                )
            return _policy(row)

    def policies(self, tenant: str | None = None) -> list[Policy]:
        """Every policy (the retrain loop's view), or one tenant's."""
        query = select(PolicyRow).order_by(PolicyRow.tenant, PolicyRow.model)
        if tenant is not None:
            query = query.where(PolicyRow.tenant == tenant)
        with self._sessions() as session:
            return [_policy(row) for row in session.scalars(query)]

    def delete_policy(self, tenant: str, model: str) -> None:
        """The policy with its runs and events."""
        with self._sessions.begin() as session:
            deleted = session.execute(delete(PolicyRow).where(PolicyRow.tenant == tenant, PolicyRow.model == model))
            if not deleted.rowcount:
                raise NotFound(f"model {model!r} has no retraining policy")
            session.execute(delete(RunRow).where(RunRow.tenant == tenant, RunRow.model == model))
            session.execute(delete(EventRow).where(EventRow.tenant == tenant, EventRow.model == model))

    # Runs

    def start_run(self, run: Run, event: RetrainEvent) -> Run | None:
        """Claim the run's policy and insert the run with its first event, atomically; None when
        the policy has a run in progress already (or is gone)."""
        with self._sessions.begin() as session:
            claimed = session.execute(
                update(PolicyRow)
                .where(PolicyRow.tenant == run.tenant, PolicyRow.model == run.model, PolicyRow.active_run == "")
                .values(active_run=run.id, last_run_time=run.create_time, last_dataset_version=run.dataset_version)
            )
            if claimed.rowcount != 1:
                return None
            session.add(RunRow(**{name: getattr(run, name) for name in RUN_COLUMNS}))
            session.add(self._event_row(run.tenant, run.model, event))
        return run

    def update_run(
        self, run: Run, from_states: tuple[RunState, ...], event: RetrainEvent | None = None, **changes: Any
    ) -> Run | None:
        """Change the run if it is still in one of `from_states` (else None), with an optional
        event, atomically. A run reaching a terminal state releases its policy's claim."""
        with self._sessions.begin() as session:
            result = session.execute(
                update(RunRow)
                .where(RunRow.id == run.id, RunRow.state.in_([s.value for s in from_states]))
                .values(**{k: v.value if isinstance(v, RunState) else v for k, v in changes.items()})
            )
            if result.rowcount != 1:
                return None
            if event is not None:
                session.add(self._event_row(run.tenant, run.model, event))
            state = changes.get("state")
            if state is not None and RunState(state).terminal:
                session.execute(
                    update(PolicyRow)
                    .where(PolicyRow.tenant == run.tenant, PolicyRow.model == run.model, PolicyRow.active_run == run.id)
                    .values(active_run="")
                )
        return replace(run, **changes)

    def add_event(self, run: Run, event: RetrainEvent) -> None:
        with self._sessions.begin() as session:
            session.add(self._event_row(run.tenant, run.model, event))

    def active_runs(self) -> list[Run]:
        """Every tenant's runs in progress, oldest first (the retrain loop's view)."""
        query = select(RunRow).where(RunRow.state.in_([s.value for s in ACTIVE_RUN_STATES])).order_by(RunRow.id)
        with self._sessions() as session:
            return [_run(row) for row in session.scalars(query)]

    def get_run(self, run_id: str) -> Run | None:
        with self._sessions() as session:
            row = session.get(RunRow, run_id)
            return None if row is None else _run(row)

    def runs(self, tenant: str, model: str, limit: int) -> list[Run]:
        """The model's latest runs, newest first."""
        query = (select(RunRow).where(RunRow.tenant == tenant, RunRow.model == model)
                 .order_by(RunRow.id.desc()).limit(limit))
        with self._sessions() as session:
            return [_run(row) for row in session.scalars(query)]

    def events(self, tenant: str, model: str, limit: int) -> list[RetrainEvent]:
        """The model's latest events, oldest first."""
        query = (select(EventRow).where(EventRow.tenant == tenant, EventRow.model == model)
                 .order_by(EventRow.id.desc()).limit(limit))
        with self._sessions() as session:
            rows = list(session.scalars(query))
        return [_event(row) for row in reversed(rows)]

    def events_after(self, after_id: int, limit: int) -> list[TenantEvent]:
        """Every tenant's events with an id above `after_id`, oldest first, at most `limit`."""
        query = select(EventRow).where(EventRow.id > after_id).order_by(EventRow.id).limit(limit)
        with self._sessions() as session:
            return [TenantEvent(row.id, row.tenant, row.model, _event(row)) for row in session.scalars(query)]

    @staticmethod
    def _event_row(tenant: str, model: str, event: RetrainEvent) -> EventRow:
        return EventRow(tenant=tenant, model=model, run_id=event.run_id, time=event.time, step=event.step,
                        message=event.message)
