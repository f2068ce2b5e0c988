"""the serving fleet: replicas per deployment (bounds, autoscaling target, the count wanted now),
the Triton nodes, and the autoscaler's decisions

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Rows written before had one replica, always.
COLUMNS = (
    ("min_replicas", "1"),
    ("max_replicas", "1"),
    ("desired_replicas", "1"),
    ("target_in_flight", "0"),
)


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, default in COLUMNS:
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default=default))
    op.create_table(
        "nodes",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("model_slots", sa.Integer, nullable=False),
        sa.Column("memory_mb", sa.BigInteger, nullable=False),
        sa.Column("gpus", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("last_contact", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "scaling_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(32), nullable=False, index=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("from_replicas", sa.Integer, nullable=False),
        sa.Column("to_replicas", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("scaling_events")
    op.drop_table("nodes")
    with op.batch_alter_table("deployments") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
