"""Prediction monitoring: each deployment's logging settings, the logged calls (their prediction,
payloads when kept, the label sent as feedback), the summaries of their inputs and outputs per
time bucket, and the payload bytes kept per day.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prediction_logging",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("deployment", sa.String(63), primary_key=True),
        sa.Column("sample_rate", sa.Float, nullable=False),
        sa.Column("byte_budget_per_day", sa.BigInteger, nullable=False),
        sa.Column("keep_payloads", sa.Boolean, nullable=False),
        sa.Column("retention_days", sa.Integer, nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "prediction_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("deployment", sa.String(63), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("predicted", sa.Float, nullable=True),
        sa.Column("inputs_json", sa.Text, nullable=True),
        sa.Column("outputs_json", sa.Text, nullable=True),
        sa.Column("label", sa.Float, nullable=True),
    )
    op.create_index("ix_prediction_samples_time", "prediction_samples", ["tenant", "deployment", "time"])
    op.create_index(
        "ix_prediction_samples_request_id", "prediction_samples", ["tenant", "deployment", "request_id"]
    )
    op.create_table(
        "prediction_summaries",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("deployment", sa.String(63), primary_key=True),
        sa.Column("version", sa.BigInteger, primary_key=True),
        sa.Column("bucket_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("writer", sa.String(32), primary_key=True),
        sa.Column("samples", sa.BigInteger, nullable=False),
        sa.Column("summary", sa.Text, nullable=False),
    )
    op.create_table(
        "prediction_payload_bytes",
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("deployment", sa.String(63), primary_key=True),
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("prediction_payload_bytes")
    op.drop_table("prediction_summaries")
    op.drop_index("ix_prediction_samples_request_id", "prediction_samples")
    op.drop_index("ix_prediction_samples_time", "prediction_samples")
    op.drop_table("prediction_samples")
    op.drop_table("prediction_logging")
