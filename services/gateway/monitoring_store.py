"""Prediction monitoring in the gateway's SQL: each deployment's logging settings, the logged
calls, the summaries of their inputs and outputs, and the payload bytes kept per day. Every
query names the tenant.

Synchronous on purpose: async callers run these methods with `asyncio.to_thread`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.common.summaries import Summary
from services.gateway.store import _utc

metadata = MetaData()

prediction_logging = Table(
    "prediction_logging",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("deployment", String(63), primary_key=True),
    Column("sample_rate", Float, nullable=False),
    Column("byte_budget_per_day", BigInteger, nullable=False),
    Column("keep_payloads", Boolean, nullable=False),
    Column("retention_days", Integer, nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
)

# One row per logged call. `predicted` (the class index, or a regressor's value) is kept for
# every call of one row, so that feedback can be scored without payloads; payloads only when
# the deployment keeps them and its day's byte budget allows.
prediction_samples = Table(
    "prediction_samples",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant", String(63), nullable=False),
    Column("deployment", String(63), nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("row_count", Integer, nullable=False),
    Column("predicted", Float, nullable=True),
    Column("inputs_json", Text, nullable=True),
    Column("outputs_json", Text, nullable=True),
    Column("label", Float, nullable=True),
)

# Each gateway process (`writer`) replaces its own row of a bucket as it counts more into it;
# readers add the rows of every writer up.
prediction_summaries = Table(
    "prediction_summaries",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("deployment", String(63), primary_key=True),
    Column("version", BigInteger, primary_key=True),
    Column("bucket_start", DateTime(timezone=True), primary_key=True),
    Column("writer", String(32), primary_key=True),
    Column("samples", BigInteger, nullable=False),
    Column("summary", Text, nullable=False),  # services.common.summaries.Summary.to_json()
)

prediction_payload_bytes = Table(
    "prediction_payload_bytes",
    metadata,
    Column("tenant", String(63), primary_key=True),
    Column("deployment", String(63), primary_key=True),
    Column("day", String(10), primary_key=True),  # YYYY-MM-DD, UTC
    Column("bytes", BigInteger, nullable=False),
)

# Which rows of a table a statement touches.
Scope = Callable[[Table], ColumnElement[bool]]
# Request ids looked up per statement when labels are matched (well under any IN-list limit).
MATCH_CHUNK = 500


@dataclass(frozen=True)
class LoggingRecord:
    tenant: str
    deployment: str
    sample_rate: float
    byte_budget_per_day: int
    keep_payloads: bool
    retention_days: int
    update_time: datetime


@dataclass(frozen=True)
class SampleRecord:
    tenant: str
    deployment: str
    version: int
    request_id: str
    time: datetime
    rows: int
    predicted: float | None  # None for a call of several rows
    inputs_json: str | None = None
    outputs_json: str | None = None
    label: float | None = None

    @property
    def payload_bytes(self) -> int:
        return len(self.inputs_json or "") + len(self.outputs_json or "")


@dataclass(frozen=True)
class SummaryRecord:
    tenant: str
    deployment: str
    version: int
    bucket_start: datetime
    samples: int
    summary: str


@dataclass(frozen=True)
class LabelStats:
    """Sums over the labelled calls of a window, enough for accuracy and R^2."""

    labelled: int = 0
    correct: int = 0
    label_sum: float = 0.0
    label_square_sum: float = 0.0
    error_square_sum: float = 0.0


def _logging(row) -> LoggingRecord:  # type: ignore[no-untyped-def]
    return LoggingRecord(
        row.tenant,
        row.deployment,
        row.sample_rate,
        row.byte_budget_per_day,
        row.keep_payloads,
        row.retention_days,
        _utc(row.update_time),
    )


class MonitoringStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- logging settings --------------------------------------------------------------------
    def set_logging(self, record: LoggingRecord) -> None:
        values = {
            "sample_rate": record.sample_rate,
            "byte_budget_per_day": record.byte_budget_per_day,
            "keep_payloads": record.keep_payloads,
            "retention_days": record.retention_days,
            "update_time": record.update_time,
        }
        upsert = self._insert(prediction_logging).values(
            tenant=record.tenant, deployment=record.deployment, **values
        )
        with Session(self.engine) as session, session.begin():
            session.execute(upsert.on_conflict_do_update(index_elements=["tenant", "deployment"], set_=values))

    def get_logging(self, tenant: str, deployment: str) -> LoggingRecord | None:
        query = select(prediction_logging).where(
            prediction_logging.c.tenant == tenant, prediction_logging.c.deployment == deployment
        )
        with Session(self.engine) as session:
            row = session.execute(query).first()
        return _logging(row) if row else None

    def list_logging(self) -> list[LoggingRecord]:
        with Session(self.engine) as session:
            return [_logging(row) for row in session.execute(select(prediction_logging))]

    # --- what the recorder writes ------------------------------------------------------------
    def write(
        self,
        samples: Sequence[SampleRecord],
        budgets: Mapping[tuple[str, str], int],
        summaries: Sequence[SummaryRecord],
        writer: str,
    ) -> int:
        """Adds the samples, and the summaries into this writer's rows of their buckets, in one
        transaction.
        A sample's payloads are kept only while its deployment's bytes of the sample's UTC day stay
        within `budgets[(tenant, deployment)]`; returns how many payloads the budget dropped."""
        dropped = 0
        with Session(self.engine) as session, session.begin():
            rows = []
            for sample in samples:
                if sample.inputs_json is not None and not self._spend(
                    session, sample, budgets.get((sample.tenant, sample.deployment), 0)
                ):
                    sample = replace(sample, inputs_json=None, outputs_json=None)
                    dropped += 1
                rows.append({
                    "tenant": sample.tenant,
                    "deployment": sample.deployment,
                    "version": sample.version,
                    "request_id": sample.request_id,
                    "time": sample.time,
                    "row_count": sample.rows,
                    "predicted": sample.predicted,
                    "inputs_json": sample.inputs_json,
                    "outputs_json": sample.outputs_json,
                    "label": sample.label,
                })
            if rows:
                session.execute(insert(prediction_samples), rows)
            for summary in summaries:
                self._add_summary(session, summary, writer)
        return dropped

    def _add_summary(self, session: Session, summary: SummaryRecord, writer: str) -> None:
        """Count a summary into this writer's row of its bucket. Only the writer's own process
        writes the row, so reading it and writing it back in one transaction loses nothing."""
        table = prediction_summaries
        key = (
            (table.c.tenant == summary.tenant)
            & (table.c.deployment == summary.deployment)
            & (table.c.version == summary.version)
            & (table.c.bucket_start == summary.bucket_start)
            & (table.c.writer == writer)
        )
        stored = session.execute(select(table.c.summary).where(key).with_for_update()).scalar_one_or_none()
        if stored is None:
            session.execute(
                insert(table).values(
                    tenant=summary.tenant,
                    deployment=summary.deployment,
                    version=summary.version,
                    bucket_start=summary.bucket_start,
                    writer=writer,
                    samples=summary.samples,
                    summary=summary.summary,
                )
            )
            return
        combined = Summary.from_json(stored)
        combined.absorb(Summary.from_json(summary.summary))
        session.execute(update(table).where(key).values(samples=combined.samples, summary=combined.to_json()))

    def _spend(self, session: Session, sample: SampleRecord, budget: int) -> bool:
        """Counts the sample's payload bytes against its deployment's day if they fit the budget
        (one conditional update, exact across gateway processes)."""
        size = sample.payload_bytes
        if size > budget:
            return False
        day = sample.time.strftime("%Y-%m-%d")
        key = {"tenant": sample.tenant, "deployment": sample.deployment, "day": day}
        session.execute(self._insert(prediction_payload_bytes).values(**key, bytes=0).on_conflict_do_nothing())
        table = prediction_payload_bytes
        spent = session.execute(
            update(table)
            .where(
                table.c.tenant == sample.tenant,
                table.c.deployment == sample.deployment,
                table.c.day == day,
                table.c.bytes + size <= budget,
            )
            .values(bytes=table.c.bytes + size)
        )
        return spent.rowcount == 1

    # --- reading -----------------------------------------------------------------------------
    def newest_samples(self, tenant: str, deployment: str, limit: int) -> list[SampleRecord]:
        """The newest calls logged with their payloads, newest first."""
        table = prediction_samples
        query = (
            select(table)
            .where(table.c.tenant == tenant, table.c.deployment == deployment, table.c.inputs_json.is_not(None))
            .order_by(table.c.time.desc(), table.c.id.desc())
            .limit(limit)
        )
        with Session(self.engine) as session:
            return [
                SampleRecord(
                    row.tenant,
                    row.deployment,
                    row.version,
                    row.request_id,
                    _utc(row.time),
                    row.row_count,
                    row.predicted,
                    row.inputs_json,
                    row.outputs_json,
                    row.label,
                )
                for row in session.execute(query)
            ]

    def window_summaries(self, tenant: str, deployment: str, version: int, since: datetime) -> list[str]:
        """The summaries (JSON) of every writer's buckets that start at or after `since`."""
        table = prediction_summaries
        query = select(table.c.summary).where(
            table.c.tenant == tenant,
            table.c.deployment == deployment,
            table.c.version == version,
            table.c.bucket_start >= since,
        )
        with Session(self.engine) as session:
            return list(session.scalars(query))

    def window_rows(self, tenant: str, deployment: str, version: int, since: datetime) -> int:
        """Rows (predictions) of the calls logged since `since`."""
        table = prediction_samples
        query = select(func.coalesce(func.sum(table.c.row_count), 0)).where(
            table.c.tenant == tenant,
            table.c.deployment == deployment,
            table.c.version == version,
            table.c.time >= since,
        )
        with Session(self.engine) as session:
            return int(session.execute(query).scalar_one())

    def label_stats(self, tenant: str, deployment: str, version: int, since: datetime) -> LabelStats:
        table = prediction_samples
        error = table.c.label - table.c.predicted
        query = select(
            func.count(),
            func.coalesce(func.sum(case((table.c.label == table.c.predicted, 1), else_=0)), 0),
            func.coalesce(func.sum(table.c.label), 0.0),
            func.coalesce(func.sum(table.c.label * table.c.label), 0.0),
            func.coalesce(func.sum(error * error), 0.0),
        ).where(
            table.c.tenant == tenant,
            table.c.deployment == deployment,
            table.c.version == version,
            table.c.time >= since,
            table.c.label.is_not(None),
            table.c.predicted.is_not(None),
        )
        with Session(self.engine) as session:
            labelled, correct, total, squares, errors = session.execute(query).one()
        return LabelStats(int(labelled), int(correct), float(total), float(squares), float(errors))

    # --- feedback ----------------------------------------------------------------------------
    def attach_labels(self, tenant: str, deployment: str, labels: Mapping[str, float]) -> set[str]:
        """Sets the label of the logged calls of one prediction with these request ids; returns
        the request ids that matched one."""
        table = prediction_samples
        matched: set[str] = set()
        ids = list(labels)
        with Session(self.engine) as session, session.begin():
            for start in range(0, len(ids), MATCH_CHUNK):
                chunk = ids[start : start + MATCH_CHUNK]
                found = session.scalars(
                    select(table.c.request_id).distinct().where(
                        table.c.tenant == tenant,
                        table.c.deployment == deployment,
                        table.c.request_id.in_(chunk),
                        table.c.predicted.is_not(None),
                    )
                )
                matched.update(found)
            if matched:
                session.execute(
                    update(table)
                    .where(
                        table.c.tenant == tenant,
                        table.c.deployment == deployment,
                        table.c.request_id == bindparam("wanted"),
                        table.c.predicted.is_not(None),
                    )
                    .values(label=bindparam("value")),
                    [{"wanted": request_id, "value": labels[request_id]} for request_id in matched],
                )
        return matched

    # --- retention ---------------------------------------------------------------------------
    def delete_expired(self, now: datetime, default_retention_days: int) -> int:
        """Deletes samples and summaries older than their deployment's retention (the default's
        for a deployment without settings) and the byte counts of past days; returns how many
        samples went."""
        deleted = 0
        with Session(self.engine) as session, session.begin():
            for config in session.execute(select(prediction_logging)):
                cutoff = now - timedelta(days=config.retention_days)
                deleted += self._delete_before(session, cutoff, _of(config.tenant, config.deployment))
            cutoff = now - timedelta(days=default_retention_days)
            deleted += self._delete_before(session, cutoff, _unconfigured)
            yesterday = (now - timedelta(days=1)).strftime("%Y-%m-%d")
            session.execute(delete(prediction_payload_bytes).where(prediction_payload_bytes.c.day < yesterday))
        return deleted

    @staticmethod
    def _delete_before(session: Session, cutoff: datetime, scope: Scope) -> int:
        samples = session.execute(
            delete(prediction_samples).where(scope(prediction_samples), prediction_samples.c.time < cutoff)
        )
        session.execute(
            delete(prediction_summaries).where(
                scope(prediction_summaries), prediction_summaries.c.bucket_start < cutoff
            )
        )
        return samples.rowcount

    def _insert(self, table: Table):  # type: ignore[no-untyped-def]
        """INSERT with ON CONFLICT support for the engine's dialect."""
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)


def _of(tenant: str, deployment: str) -> Scope:
    """One deployment's rows."""
    return lambda table: and_(table.c.tenant == tenant, table.c.deployment == deployment)


def _unconfigured(table: Table) -> ColumnElement[bool]:
    """Rows of deployments without logging settings."""
    settings = prediction_logging
    return ~exists().where(settings.c.tenant == table.c.tenant, settings.c.deployment == table.c.deployment)
