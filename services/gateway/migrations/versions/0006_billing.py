"""Billing: the price book, plans and tenants' plans, budgets, finalized invoices, credit notes
and the counters that number them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "prices",
        sa.Column("resource", sa.String(32), primary_key=True),
        sa.Column("tier", sa.String(32), primary_key=True),
        sa.Column("effective_day", sa.String(10), primary_key=True),
        sa.Column("amount", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "plans",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "plan_allowances",
        sa.Column("plan", sa.String(63), sa.ForeignKey("plans.name"), primary_key=True),
        sa.Column("resource", sa.String(32), primary_key=True),
        sa.Column("tier", sa.String(32), primary_key=True),
        sa.Column("quantity", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "tenant_plans",
        sa.Column("tenant", sa.String(63), sa.ForeignKey("tenants.name"), primary_key=True),
        sa.Column("start_month", sa.String(7), primary_key=True),
        sa.Column("plan", sa.String(63), sa.ForeignKey("plans.name"), nullable=False),
    )
    op.create_table(
        "budgets",
        sa.Column("tenant", sa.String(63), sa.ForeignKey("tenants.name"), primary_key=True),
        sa.Column("amount", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "invoices",
        sa.Column("number", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(63), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("month", sa.String(7), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("total_minor", sa.BigInteger, nullable=False),
        sa.Column("credited_minor", sa.BigInteger, nullable=False),
        sa.Column("document", sa.Text, nullable=False),
        sa.Column("finalize_time", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "month", name="uq_invoices_tenant_month"),
    )
    op.create_table(
        "credit_notes",
        sa.Column("number", sa.String(32), primary_key=True),
        sa.Column("invoice_number", sa.String(32), sa.ForeignKey("invoices.number"), nullable=False),
        sa.Column("tenant", sa.String(63), nullable=False),
        sa.Column("amount", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(1024), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_credit_notes_invoice_number", "credit_notes", ["invoice_number"])
    op.create_table(
        "billing_counters",
        sa.Column("series", sa.String(16), primary_key=True),
        sa.Column("last_number", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "billing_counters",
        "credit_notes",
        "invoices",
        "budgets",
        "tenant_plans",
        "plan_allowances",
        "plans",
        "prices",
    ):
        op.drop_table(table)
