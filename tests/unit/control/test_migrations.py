"""The Alembic migrations build exactly the schema the ORM models describe, on SQLite with WAL and foreign keys."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from strata.control import migrations
from strata.control.db import Base, make_engine
from strata.control.errors import StoreError


def test_migrations_match_the_models_and_are_idempotent(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'strata.db'}")
    try:
        migrations.upgrade(engine)
        migrations.upgrade(engine)
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            heads = ScriptDirectory.from_config(migrations.alembic_config(engine)).get_heads()
            assert len(heads) == 1, f"the migrations must form one line, found heads {heads}"
            assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == heads[0]
    finally:
        engine.dispose()


def _tables(path: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _revision(path: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        return None if row is None else str(row[0])


def _in_the_way(path: Path, table: str) -> None:
    """A table of a later migration's name already there: that migration's CREATE TABLE fails part-way through."""
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(f"CREATE TABLE {table} (x INTEGER)")
        connection.commit()


def _out_of_the_way(path: Path, table: str) -> None:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute(f"DROP TABLE {table}")
        connection.commit()


def test_a_first_migration_that_fails_part_way_leaves_no_tables_and_the_next_start_migrates(tmp_path: Path) -> None:
    path = tmp_path / "strata.db"
    _in_the_way(path, "fleet_events")  # made by 0010_events, after nine migrations and some twenty tables
    engine = make_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(StoreError, match="fleet_events already exists"):
            migrations.upgrade(engine)
        assert _tables(path) == {"fleet_events"}  # not api_tokens and the rest, committed one by one
        _out_of_the_way(path, "fleet_events")
        migrations.upgrade(engine)
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_an_upgrade_that_fails_part_way_leaves_the_previous_revision(tmp_path: Path) -> None:
    path = tmp_path / "strata.db"
    sqlite3.connect(path).close()  # the engine of `make_engine` opens the file, only `upgrade` creates it
    engine = make_engine(f"sqlite:///{path}")
    try:
        command.upgrade(migrations.alembic_config(engine), "0005_supply")
        before = _tables(path)
        _in_the_way(path, "fleet_events")
        with pytest.raises(StoreError, match="fleet_events already exists"):
            migrations.upgrade(engine)
        assert _revision(path) == "0005_supply"
        assert _tables(path) == before | {"fleet_events"}  # no leases, node_certificates... of 0006 to 0009
        _out_of_the_way(path, "fleet_events")
        migrations.upgrade(engine)
        heads = ScriptDirectory.from_config(migrations.alembic_config(engine)).get_heads()
        assert _revision(path) == heads[0]
    finally:
        engine.dispose()
