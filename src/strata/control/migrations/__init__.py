"""Alembic migrations of the control plane schema, applied programmatically when the server starts."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

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
        raise StoreError(f"cannot migrate the database: {exc}") from exc
