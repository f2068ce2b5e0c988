"""deployments: the desired state Triton is reconciled to

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("model", sa.String(63), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=True),
        sa.Column("alias", sa.String(63), nullable=True),
        sa.Column("resolved_version", sa.BigInteger, nullable=False),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("max_batch_size", sa.Integer, nullable=False),
        sa.Column("device", sa.String(8), nullable=False),
        sa.Column("cacheable", sa.Boolean, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("triton_model", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("signature", sa.LargeBinary, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "name", name="uq_deployments_tenant_name"),
        sa.UniqueConstraint("triton_model", name="uq_deployments_triton_model"),
    )


def downgrade() -> None:
    op.drop_table("deployments")
