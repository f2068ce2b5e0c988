"""Price tiers and replica metering.

- deployments.tier / canary_tier: the price tier of the served version (fp32, fp16, int8,
  distilled), from its precision and lineage when it was resolved.
- replica_usage: replica-seconds per tenant, deployment, tier and UTC day (billed per replica-hour).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("tier", sa.String(32), nullable=False, server_default=""))
        batch.add_column(sa.Column("canary_tier", sa.String(32), nullable=True))
    op.create_table(
        "replica_usage",
        sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD, UTC
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("deployment", sa.String(63), primary_key=True),
        sa.Column("tier", sa.String(32), primary_key=True),
        sa.Column("replica_seconds", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("replica_usage")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("canary_tier")
        batch.drop_column("tier")
