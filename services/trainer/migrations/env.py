"""Alembic environment: services.common.database.upgrade hands us an open connection."""

from alembic import context

context.configure(
    connection=context.config.attributes["connection"],
    # Its own version table, so the trainer can share a PostgreSQL database with other services.
    version_table="trainer_alembic_version",
)
with context.begin_transaction():
    context.run_migrations()
