"""Encryption at rest, download protection and storage metering.

- blob_keys: each blob's data key, wrapped by the key-encryption key (never stored in plaintext).
- models.no_download: only an admin may download such a model's weights.
- storage_usage: the bytes each tenant stored, sampled once per UTC day (billed per GB-month).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blob_keys",
        sa.Column("sha256", sa.String(64), primary_key=True),
        # The blob's AES-256-GCM data key, encrypted by the key-encryption key `kek_id` names.
        sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
        sa.Column("kek_id", sa.String(64), nullable=False),
        sa.Column("algorithm", sa.String(32), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("no_download", sa.Boolean, nullable=False, server_default=sa.false()))
    op.create_table(
        "storage_usage",
        sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD, UTC
        sa.Column("tenant", sa.String(128), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("storage_usage")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("no_download")
    op.drop_table("blob_keys")
