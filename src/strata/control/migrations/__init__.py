"""Alembic migrations of the control plane schema, applied programmatically when the server starts."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from strata.control.db import redact, safe_url
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
    """Bring the database behind `engine` to the newest schema; a database already there is left alone.

    Raises:
        StoreError: the database cannot be reached, or a migration fails (it is rolled back where the database
            supports transactional DDL).
    """
    try:
        command.upgrade(alembic_config(engine), "head")
    except (SQLAlchemyError, CommandError) as exc:
        raise migration_error(engine, exc) from exc


def migration_error(engine: Engine, exc: Exception) -> StoreError:
    """What to say when migrating (or locking the database to migrate it) failed: the driver's own words, not
    SQLAlchemy's (which add the statement and a link); the URL without its password, and the message scrubbed of
    it in case a driver echoes it."""
    if isinstance(exc, DBAPIError):
        reason = " ".join(str(exc.orig).split()) or type(exc.orig).__name__
    else:
        reason = str(exc) or type(exc).__name__
    return StoreError(f"cannot migrate the database {safe_url(engine.url)}: {redact(reason, engine.url)}")
