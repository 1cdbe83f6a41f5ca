"""Alembic environment: runs on the connection :func:`covey.coordinator.ledger.store.migrate`
passes in ``config.attributes["connection"]``."""

from alembic import context

from covey.coordinator.ledger.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
