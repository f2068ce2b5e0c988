"""deployments: an optional canary version served beside the deployment's own

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

COLUMNS = (
    ("canary_version", sa.BigInteger),
    ("canary_weight", sa.Integer),
    ("canary_max_error_rate", sa.Float),
    ("canary_state", sa.String(16)),
    ("canary_message", sa.Text),
    ("canary_triton_model", sa.String(64)),
    ("canary_sha256", sa.String(64)),
    ("canary_format", sa.String(16)),
)


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
