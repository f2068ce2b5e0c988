"""deployments: each one's execution limit per request and its artifact's size (for the
tenant's memory cap)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# 0 for rows written before: the service's default limit, and an artifact not yet counted.
COLUMNS = (
    ("execution_limit_seconds", sa.Integer, "0"),
    ("artifact_bytes", sa.BigInteger, "0"),
)


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, kind, default in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=False, server_default=default))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, _, _ in reversed(COLUMNS):
            batch.drop_column(name)
