"""Download audit bytes and billable usage.

- audit_events.bytes: how many bytes a download sent (NULL for every other call).
- billable_usage: what each tenant used per UTC day, by billable resource and price tier,
  in the resource's base unit (requests, tokens, seconds); invoices price these rows.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("bytes", sa.BigInteger, nullable=True))
    op.create_table(
        "billable_usage",
        sa.Column("day", sa.String(10), primary_key=True),  # YYYY-MM-DD, UTC
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("resource", sa.String(32), primary_key=True),
        sa.Column("tier", sa.String(32), primary_key=True),
        sa.Column("quantity", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("billable_usage")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("bytes")
