"""A control plane's start on its data folder: a first start makes the database; a fleet whose SQLite database is
gone is refused rather than started empty; a database deleted under a running server is not made again."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.control import migrations
from strata.control.db import Database, make_engine
from strata.control.errors import StoreError
from strata.control.plane import ControlPlane
from strata.control.settings import ServerSettings
from strata.core.errors import ConfigError


def _start_and_stop(data_dir: Path) -> None:
    plane = ControlPlane.build(ServerSettings(data_dir=data_dir, presence_flush_s=3600))
    plane.start()
    plane.stop()


def _database_files(data_dir: Path) -> list[str]:
    return sorted(path.name for path in data_dir.glob("strata.db*"))


def test_a_database_deleted_under_the_server_is_an_error_not_a_new_empty_one(tmp_path: Path) -> None:
    path = tmp_path / "strata.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        migrations.upgrade(engine)
        database = Database(engine)
        database.ping()
        engine.dispose()  # the next request needs a new connection, as after a pooled one was dropped
        for name in _database_files(tmp_path):
            (tmp_path / name).unlink()
        with pytest.raises(StoreError):
            database.ping()
        assert _database_files(tmp_path) == []
    finally:
        engine.dispose()


def test_a_fleets_data_folder_without_its_database_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    _start_and_stop(data_dir)
    plane = ControlPlane.build(ServerSettings(data_dir=data_dir, presence_flush_s=3600))
    plane.pki.server_tls(("localhost",))  # as `strata server` makes it, after migrating
    (data_dir / "blobs" / "ab").mkdir()  # as a push leaves it
    for name in _database_files(data_dir):
        (data_dir / name).unlink()
    with pytest.raises(ConfigError, match=r"strata\.db is missing") as refused:
        _start_and_stop(data_dir)
    assert "backup" in str(refused.value)
    assert "--data-dir" in str(refused.value)
    assert _database_files(data_dir) == []


def test_a_first_start_and_one_that_stopped_before_making_its_database_are_not_refused(tmp_path: Path) -> None:
    _start_and_stop(tmp_path / "new")
    assert (tmp_path / "new" / "strata.db").is_file()
    # What a first start leaves when it dies before its database: the lock file and empty folders; and an admin
    # token the operator chose, which the new database adopts.
    crashed = tmp_path / "crashed"
    for folder in ("blobs", "tmp", "pki"):
        (crashed / folder).mkdir(parents=True)
    (crashed / "start.lock").touch()
    (crashed / "admin.token").write_text("operator-chosen-secret\n")
    _start_and_stop(crashed)
    assert (crashed / "strata.db").is_file()
