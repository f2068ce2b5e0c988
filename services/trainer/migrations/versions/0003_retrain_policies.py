"""Retraining policies, their runs and the runs' events (services/trainer/retrain.py).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retrain_policies",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("model", sa.String(63), primary_key=True),
        sa.Column("trigger", sa.String(24), nullable=False),
        sa.Column("dataset", sa.String(63), nullable=False),
        sa.Column("from_version", sa.Integer, nullable=False),
        sa.Column("interval_seconds", sa.BigInteger, nullable=False),
        sa.Column("deployment", sa.String(63), nullable=False),
        sa.Column("metric", sa.String(16), nullable=False),
        sa.Column("min_gain", sa.Float, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("alias", sa.String(63), nullable=False),
        sa.Column("canary_weight_percent", sa.Integer, nullable=False),
        sa.Column("canary_window_seconds", sa.BigInteger, nullable=False),
        sa.Column("canary_max_error_rate", sa.Float, nullable=False),
        sa.Column("drift_threshold", sa.Float, nullable=False),
        sa.Column("cooldown_seconds", sa.BigInteger, nullable=False),
        # The training spec of from_version, reused by every run with the dataset replaced.
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_dataset_version", sa.Integer, nullable=False),
        sa.Column("last_run_time", sa.DateTime(timezone=True), nullable=True),
        # The run in progress ("" when none): claimed by a conditional update, so one at a time.
        sa.Column("active_run", sa.String(40), nullable=False, server_default=""),
    )
    op.create_table(
        "retrain_runs",
        # run-<12 hex digits of milliseconds><8 random hex digits>: sorts by creation time.
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("dataset_version", sa.Integer, nullable=False),
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("candidate_version", sa.Integer, nullable=False),
        sa.Column("serving_version", sa.Integer, nullable=False),
        sa.Column("candidate_metric", sa.Float, nullable=True),
        sa.Column("serving_metric", sa.Float, nullable=True),
        sa.Column("samples", sa.Integer, nullable=False),
        # "accepted" or "rejected" once the evaluation is stored; "" before.
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("comparison", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        # The policy as it was when the run started: a later change does not alter a run midway.
        sa.Column("policy", sa.JSON, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        # When the canary was first seen READY: its window counts from there.
        sa.Column("canary_ready_time", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_retrain_runs_tenant_model_id", "retrain_runs", ["tenant", "model", "id"])
    op.create_index("ix_retrain_runs_state", "retrain_runs", ["state"])
    op.create_table(
        "retrain_events",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("run_id", sa.String(40), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
    )
    op.create_index("ix_retrain_events_tenant_model_id", "retrain_events", ["tenant", "model", "id"])


def downgrade() -> None:
    op.drop_table("retrain_events")
    op.drop_table("retrain_runs")
    op.drop_table("retrain_policies")
