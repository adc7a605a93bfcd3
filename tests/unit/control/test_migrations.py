"""The Alembic migrations build exactly the schema the ORM models describe, on SQLite with WAL and foreign keys."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from strata.control import migrations
from strata.control.db import Base, make_engine


def test_migrations_match_the_models_and_are_idempotent(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'strata.db'}")
    try:
        migrations.upgrade(engine)
        migrations.upgrade(engine)
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            head = ScriptDirectory.from_config(migrations.alembic_config(engine)).get_current_head()
            assert head == "0002_rollouts"
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == head
    finally:
        engine.dispose()
