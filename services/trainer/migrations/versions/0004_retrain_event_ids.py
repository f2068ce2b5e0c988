"""Retraining event ids are never reused: the gateway copies the events to its audit log by id
(ListRetrainEvents after its cursor), and SQLite without AUTOINCREMENT gives the ids of a deleted
policy's newest events to the next ones, which a cursor already past them would skip. PostgreSQL's
sequence never reuses an id: nothing changes there.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # The table is copied into one made with AUTOINCREMENT; its ids and index stay.
        with op.batch_alter_table("retrain_events", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("retrain_events", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
