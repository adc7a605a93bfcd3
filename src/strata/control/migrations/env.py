"""Alembic environment: runs migrations over the engine that `strata.control.migrations.upgrade` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from strata.control.db import Base


def run_migrations_online() -> None:
    """Apply the pending migrations in one transaction over the configured engine."""
    engine = context.config.attributes["engine"]
    if not isinstance(engine, Engine):
        raise TypeError("strata migrations run through strata.control.migrations.upgrade(engine)")
    with engine.connect() as connection:
        # Both databases strata runs on roll DDL back (SQLite through `upgrade`'s engine, which emits BEGIN
        # itself); Alembic assumes SQLite does not, and would commit after each migration.
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=True, transactional_ddl=True
        )
        with context.begin_transaction():
            context.run_migrations()


run_migrations_online()
