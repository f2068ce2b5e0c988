"""Alembic environment: services.common.database.upgrade passes the open connection in."""

from alembic import context

# The service's own version table, so that a database shared by mistake cannot mix histories.
VERSION_TABLE = "inference_alembic_version"

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None, version_table=VERSION_TABLE)
with context.begin_transaction():
    context.run_migrations()
