"""Training and optimization jobs created through the gateway, until their run time is settled.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("job_id", sa.String(100), primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("api_key_id", sa.String(12), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settle_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seconds", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_training_jobs_unsettled", "training_jobs", ["settle_time"])


def downgrade() -> None:
    op.drop_index("ix_training_jobs_unsettled", "training_jobs")
    op.drop_table("training_jobs")
