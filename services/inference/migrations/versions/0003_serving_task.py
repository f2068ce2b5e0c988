"""deployments: the served version's task (PREDICT, GENERATE, EMBED), precision and the metadata
its runner needs

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Rows written before this revision are all plain tensor models.
COLUMNS = (
    ("task", sa.String(16), "PREDICT"),
    ("precision", sa.String(16), ""),
    ("runner_metadata", sa.Text, "{}"),
)


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, kind, default in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=False, server_default=default))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for name, _, _ in reversed(COLUMNS):
            batch.drop_column(name)
