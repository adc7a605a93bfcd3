"""Alembic migrations of the control plane schema, applied programmatically when the server starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from strata.control.db import redact, safe_url, sqlite_pragmas
from strata.control.errors import StoreError

_HERE = Path(__file__).parent


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration that runs this package's scripts over a connection of `engine`."""
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.set_main_option("path_separator", "os")
    config.attributes["engine"] = engine
    return config


def upgrade(engine: Engine) -> None:
    """Bring the database behind `engine` to the newest schema; a database already there is left alone. The
    pending migrations run in one transaction: one that fails (a full disk, a crash) leaves the database as it was.

    Raises:
        StoreError: the database cannot be reached, or a migration fails (it is rolled back).
    """
    migrating = _transactional_sqlite(engine) if engine.dialect.name == "sqlite" else engine
    try:
        command.upgrade(alembic_config(migrating), "head")
    except (SQLAlchemyError, CommandError) as exc:
        raise migration_error(engine, exc) from exc
    finally:
        if migrating is not engine:
            migrating.dispose()


def _transactional_sqlite(engine: Engine) -> Engine:
    """An engine on the SQLite database of `engine` whose transactions hold DDL too, and which may create the file
    (a first start). Python's sqlite3 issues no BEGIN before CREATE or ALTER, so each would commit alone and a
    failed migration would leave half a schema that no later start can migrate; here the driver's own transaction
    handling is turned off and SQLAlchemy's begin emits BEGIN IMMEDIATE (SQLAlchemy's documented pysqlite recipe).
    """
    migrating = create_engine(engine.url, poolclass=NullPool)

    @event.listens_for(migrating, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        sqlite_pragmas(dbapi_connection, record)

    @event.listens_for(migrating, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return migrating


def migration_error(engine: Engine, exc: Exception) -> StoreError:
    """What to say when migrating (or locking the database to migrate it) failed: the driver's own words, not
    SQLAlchemy's (which add the statement and a link); the URL without its password, and the message scrubbed of
    it in case a driver echoes it."""
    if isinstance(exc, DBAPIError):
        reason = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
    else:
        reason = str(exc) or type(exc).__name__
    return StoreError(f"cannot migrate the database {safe_url(engine.url)}: {redact(reason, engine.url)}")
