"""What the trainer keeps in SQL: jobs and their events.

Synchronous SQLAlchemy 2 sessions (the service calls them through `asyncio.to_thread`). Reads a
caller asks for are scoped by tenant; the scheduler's own bookkeeping (which jobs are queued or
running, state changes, events) works on job ids it got from such a scoped read or from itself.
The schema comes from migrations/, never from `metadata.create_all`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, Engine, ForeignKey, Integer, String, Text, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from services.common.errors import NotFound
from services.common.validation import MATCHES_NAMED, one_match


class JobState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    kind: str  # "training" or "optimization"
    state: JobState
    spec: dict[str, Any]
    model: str
    parent_version: int
    dataset_version: int
    create_time: datetime
    start_time: datetime | None = None
    end_time: datetime | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    attempts: int = 0
    last_sequence: int = 0
    device: str = ""  # "cpu" or "cuda", from the latest started event; "" until it starts


@dataclass(frozen=True)
class EventRecord:
    job_id: str
    sequence: int
    time: datetime
    kind: str  # queued, started, progress, checkpoint, log, finished
    payload: dict[str, Any]


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    model: Mapped[str] = mapped_column(String(63))
    parent_version: Mapped[int] = mapped_column(Integer)
    dataset_version: Mapped[int] = mapped_column(Integer)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    start_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    end_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    last_sequence: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(8), server_default="")


class EventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


def _record(row: JobRow) -> JobRecord:
    return JobRecord(
        id=row.id, tenant=row.tenant, kind=row.kind, state=JobState(row.state), spec=row.spec, model=row.model,
        parent_version=row.parent_version, dataset_version=row.dataset_version,
        create_time=_utc(row.create_time), start_time=_utc(row.start_time), end_time=_utc(row.end_time),
        progress=row.progress, result=row.result, message=row.message, attempts=row.attempts,
        last_sequence=row.last_sequence, device=row.device,
    )


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands datetimes back naive; they were written in UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def create(self, job: JobRecord, first_event: tuple[str, dict[str, Any]]) -> JobRecord:
        """Insert a job with its first event (sequence 1) in one transaction."""
        job = replace(job, last_sequence=1)
        with self._sessions.begin() as session:
            session.add(JobRow(**{k: getattr(job, k) for k in JobRow.__table__.columns.keys()}))
            session.flush()
            kind, payload = first_event
            session.add(EventRow(job_id=job.id, sequence=1, time=job.create_time, kind=kind, payload=payload))
        return job

    def get(self, tenant: str, job_id: str) -> JobRecord:
        """The tenant's job with this id or, failing that, the one whose id starts with it (`%` and
        `_` taken literally); never another tenant's."""
        query = (
            select(JobRow)
            .where(JobRow.tenant == tenant, JobRow.id.startswith(job_id, autoescape=True))
            .order_by(JobRow.id)
            .limit(MATCHES_NAMED + 1)
        )
        with self._sessions() as session:
            rows = {row.id: row for row in session.scalars(query)}
        return _record(rows[one_match("job", job_id, list(rows))])

    def get_by_id(self, job_id: str) -> JobRecord:
        with self._sessions() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} not found")
            return _record(row)

    def find(self, job_id: str) -> JobRecord | None:
        with self._sessions() as session:
            row = session.get(JobRow, job_id)
            return None if row is None else _record(row)

    def list(self, tenant: str, state: JobState | None, before_id: str, limit: int) -> list[JobRecord]:
        """Newest first: ids sort by creation time."""
        query = select(JobRow).where(JobRow.tenant == tenant).order_by(JobRow.id.desc()).limit(limit)
        if state is not None:
            query = query.where(JobRow.state == state.value)
        if before_id:
            query = query.where(JobRow.id < before_id)
        with self._sessions() as session:
            return [_record(row) for row in session.scalars(query)]

    def in_states(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Every tenant's jobs in these states, oldest first: the scheduler's view."""
        query = select(JobRow).where(JobRow.state.in_([s.value for s in states])).order_by(JobRow.id)
        with self._sessions() as session:
            return [_record(row) for row in session.scalars(query)]

    def transition(
        self, job_id: str, from_states: Iterable[JobState], to_state: JobState, event: tuple[str, dict[str, Any]] | None,
        **fields: Any,
    ) -> tuple[JobRecord, EventRecord | None] | None:
        """Move a job to `to_state` if it is in one of `from_states` (else None), with the other
        fields and an optional event, atomically: a cancel and a finish cannot both win."""
        values = {"state": to_state.value, **fields}
        with self._sessions.begin() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.state.in_([s.value for s in from_states]))
                .values(**values)
            )
            if result.rowcount != 1:
                return None
            added = self._add_event(session, job_id, event) if event else None
            row = session.get(JobRow, job_id)
            assert row is not None
            session.refresh(row)
            return _record(row), added

    def update(self, job_id: str, **fields: Any) -> None:
        with self._sessions.begin() as session:
            session.execute(update(JobRow).where(JobRow.id == job_id).values(**fields))

    def add_events(self, job_id: str, events: list[tuple[str, dict[str, Any]]], **fields: Any) -> list[EventRecord]:
        """Append events (numbered after the job's last) and update job fields in one transaction."""
        with self._sessions.begin() as session:
            added = [self._add_event(session, job_id, event) for event in events]
            if fields:
                session.execute(update(JobRow).where(JobRow.id == job_id).values(**fields))
            return added

    def events(self, job_id: str, after_sequence: int) -> list[EventRecord]:
        query = (
            select(EventRow)
            .where(EventRow.job_id == job_id, EventRow.sequence > after_sequence)
            .order_by(EventRow.sequence)
        )
        with self._sessions() as session:
            return [
                EventRecord(r.job_id, r.sequence, _utc(r.time) or now(), r.kind, r.payload)
                for r in session.scalars(query)
            ]

    @staticmethod
    def _add_event(session: Any, job_id: str, event: tuple[str, dict[str, Any]]) -> EventRecord:
        # The job row's counter, bumped in this transaction, numbers the events without gaps.
        row = session.execute(select(JobRow).where(JobRow.id == job_id).with_for_update()).scalar_one()
        row.last_sequence += 1
        kind, payload = event
        record = EventRecord(job_id, row.last_sequence, now(), kind, payload)
        session.add(EventRow(job_id=job_id, sequence=record.sequence, time=record.time, kind=kind, payload=payload))
        session.flush()
        return record
