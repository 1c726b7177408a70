"""Alembic environment: our engine (or the embedded PostgreSQL) and tables.metadata."""

from alembic import context
from flask import current_app

from pubsub import db
from pubsub.tables import metadata


def run_migrations_offline() -> None:
    context.configure(url=db.database_url(current_app), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    with db.get_engine(current_app).connect() as connection:
        context.configure(connection=connection, target_metadata=metadata, compare_type=True)
        # A migration may rewrite a large table.
        with context.begin_transaction(), db.statement_timeout_lifted(connection):
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
