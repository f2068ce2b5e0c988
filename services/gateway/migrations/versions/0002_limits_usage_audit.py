"""Rate limits per key, quotas per tenant, usage by day, the audit log.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

QUOTA_FIELDS = (
    "requests_per_day",
    "requests_per_month",
    "tokens_per_day",
    "tokens_per_month",
    "training_minutes_per_day",
    "training_minutes_per_month",
)
USAGE_FIELDS = (
    "requests",
    "cache_hits",
    "errors",
    "input_bytes",
    "output_bytes",
    "tokens",
    "training_seconds",
    "rejected",
)


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rate_requests_per_second", sa.Float, nullable=True))
        batch.add_column(sa.Column("rate_burst", sa.Integer, nullable=True))
        batch.add_column(sa.Column("rate_tokens_per_minute", sa.BigInteger, nullable=True))
    op.create_table(
        "quotas",
        sa.Column("tenant", sa.String(63), sa.ForeignKey("tenants.name"), primary_key=True),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in QUOTA_FIELDS),
        sa.Column("rate_requests_per_second", sa.Float, nullable=False),
        sa.Column("rate_burst", sa.Integer, nullable=False),
        sa.Column("rate_tokens_per_minute", sa.BigInteger, nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "usage",
        sa.Column("day", sa.String(10), primary_key=True),
        sa.Column("tenant", sa.String(63), primary_key=True),
        sa.Column("api_key_id", sa.String(12), primary_key=True),
        *(sa.Column(name, sa.BigInteger, nullable=False) for name in USAGE_FIELDS),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("api_key_id", sa.String(12), nullable=False),
        sa.Column("method", sa.String(200), nullable=False),
        sa.Column("resource", sa.String(300), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
    )
    op.create_index("ix_audit_events_tenant", "audit_events", ["tenant"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_tenant", "audit_events")
    op.drop_table("audit_events")
    op.drop_table("usage")
    op.drop_table("quotas")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("rate_tokens_per_minute")
        batch.drop_column("rate_burst")
        batch.drop_column("rate_requests_per_second")
