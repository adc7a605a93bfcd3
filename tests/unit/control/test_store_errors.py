"""What a caller is told of a database failure: the driver's short reason, never the SQL or its values; a full disk
is a 507."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from strata.control import migrations
from strata.control.db import Database, Model, make_engine
from strata.control.errors import StorageFull, StoreError

SECRET = "value-that-must-not-be-echoed"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    engine = make_engine(f"sqlite:///{tmp_path / 'strata.db'}")
    migrations.upgrade(engine)
    yield Database(engine)
    engine.dispose()


def _add_models(database: Database, count: int) -> None:
    with database.transaction() as session:
        session.add_all(Model(name=f"{SECRET}-{number}", created_at=0.0) for number in range(count))


def test_a_full_database_is_a_507_with_the_drivers_reason_and_no_statement(database: Database) -> None:
    with database.transaction() as session:
        pages = session.execute(text("PRAGMA page_count")).scalar()
        # the database may not grow: SQLite's own SQLITE_FULL, as on a full disk, without filling one
        session.execute(text(f"PRAGMA max_page_count = {pages}"))
    with pytest.raises(StorageFull) as full:
        _add_models(database, 2000)
    assert full.value.http_status == 507
    assert full.value.code == "storage_full"
    assert "database or disk is full" in full.value.message
    assert SECRET not in full.value.message
    assert "INSERT" not in full.value.message


def test_a_missing_table_is_named_without_the_statement(database: Database) -> None:
    with database.transaction() as session:
        session.execute(text("DROP TABLE pins"))
    with pytest.raises(StoreError) as failed, database.transaction() as session:
        session.execute(text("SELECT * FROM pins WHERE model = :model"), {"model": SECRET})
    assert failed.value.http_status == 503
    assert failed.value.message == "database error: no such table: pins"
