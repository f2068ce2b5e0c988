"""A deleted dataset's last version number, kept under its name: a dataset created again under
that name numbers its versions on from it (store.RetiredDatasetNumberRow).

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
        "retired_dataset_numbers",
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("last_version", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retired_dataset_numbers")
