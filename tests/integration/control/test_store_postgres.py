"""The store on both engines: the migrations build the models' schema on SQLite and PostgreSQL alike, go down and up
again; `postgresql://` means psycopg 3; and `strata server` never shows the database password, whether the URL does
not parse, the driver is missing, the server is unreachable, the login is refused, or all goes well."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.orm import Session

from strata.control import migrations
from strata.control.db import (
    ApiToken,
    Base,
    Model,
    ModelVersion,
    Node,
    Rollout,
    RolloutNode,
    TelemetryMinute,
    make_engine,
    redact,
    safe_url,
)
from strata.control.errors import StoreError
from strata.control.rollout_plan import RolloutSpec
from strata.control.rollouts import state_of
from strata.control.settings import ServerSettings
from strata.core.errors import ConfigError
from strata.testing.postgres import PostgresCluster

SECRET = "secretpw"


def test_migrations_build_the_models_schema_and_go_down_and_up_again(settings: ServerSettings) -> None:
    # The PostgreSQL database is a clone of the migrated template: down to nothing and up again runs every step.
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    try:
        migrations.upgrade(engine)
        command.downgrade(migrations.alembic_config(engine), "base")
        with engine.connect() as connection:
            assert set(Base.metadata.tables) & set(connection.dialect.get_table_names(connection)) == set()
        migrations.upgrade(engine)
        migrations.upgrade(engine)
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


# (the revision before the column, the client errors and shed requests the row keeps after the way down and up)
@pytest.mark.parametrize(
    ("before", "kept"), [("0011_node_logs", (0, 0)), ("0013_rollout_refused", (2, 0))], ids=["client_errors", "shed"]
)
def test_telemetry_minutes_stored_before_a_count_keep_their_counts_with_none(
    settings: ServerSettings, before: str, kept: tuple[int, int]
) -> None:
    # A control plane upgraded in place: the minutes its nodes sent before the column count none of it.
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    config = migrations.alembic_config(engine)
    try:
        migrations.upgrade(engine)
        with Session(engine) as session, session.begin():
            session.add(
                Node(id="n1", name="edge", tier="device", labels={}, profile="cpu-generic", emulated=False,
                     agent_version="0", facts={}, credential_hash="a" * 64, enrolled_at=0.0)
            )  # fmt: skip
            session.flush()
            session.add(
                TelemetryMinute(node_id="n1", model="digits", version="1", variant="v", minute=7, requests=10,
                                errors=4, items=10, latency_sum_us=0, queue_sum_us=0, latency=[10], client_errors=2,
                                shed=1)
            )  # fmt: skip
        command.downgrade(config, before)  # the schema before the column, with the row in it
        migrations.upgrade(engine)
        with Session(engine) as session:
            row = session.get(TelemetryMinute, ("n1", "digits", "1", "v", 7))
            assert row is not None
            assert (row.requests, row.errors, row.client_errors, row.shed) == (10, 4, *kept)
    finally:
        engine.dispose()


def test_tokens_stored_before_names_have_none_and_revoked_ones_go_on_the_way_down(settings: ServerSettings) -> None:
    # An upgraded control plane: its old tokens have no name and no recorded use, and none is revoked; taken down
    # below names, a revoked token is deleted (the older server would accept it again), a live one kept.
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    config = migrations.alembic_config(engine)
    try:
        migrations.upgrade(engine)
        with Session(engine) as session, session.begin():
            session.add(ApiToken(id="live", scope="admin", token_hash="a" * 64, created_at=1.0, name="ci"))
            session.add(ApiToken(id="gone", scope="read", token_hash="b" * 64, created_at=1.0, revoked_at=2.0))
        command.downgrade(config, "0014_shed")
        migrations.upgrade(engine)
        with Session(engine) as session:
            rows = session.query(ApiToken).all()
            assert [(t.id, t.name, t.last_used_at, t.revoked_at) for t in rows] == [("live", None, None, None)]
    finally:
        engine.dispose()


def test_rollout_nodes_stored_before_the_refused_column_are_read_as_refused_by_their_words(
    settings: ServerSettings,
) -> None:
    # Before the column, "the node refused it: ..." at the start of the exclusion was what kept a node out for
    # good; upgraded in place, such a row says so in the column, and a node a pin kept out does not.
    settings.data_dir.mkdir(parents=True)
    engine = make_engine(settings.database_url)
    config = migrations.alembic_config(engine)
    words = {"n1": "the node refused it: refused by placement policy", "n2": "pinned to 1 by pin 3", "n3": None}
    try:
        migrations.upgrade(engine)
        with Session(engine) as session, session.begin():
            session.add(Model(id=1, name="digits", created_at=0.0))
            session.add(ModelVersion(id=1, model_id=1, version="2", created_at=0.0))
            for node_id in words:
                session.add(
                    Node(id=node_id, name=f"edge-{node_id}", tier="device", labels={}, profile="cpu-generic",
                         emulated=False, agent_version="0", facts={}, credential_hash=node_id * 32, enrolled_at=0.0)
                )  # fmt: skip
            session.add(
                Rollout(id=1, version_id=1, selector={}, spec=RolloutSpec().to_json(), status="running", wave=0,
                        gate_results=[], baseline={}, message="", created_at=0.0)
            )  # fmt: skip
            session.flush()
            for place, (node_id, excluded) in enumerate(words.items()):
                session.add(
                    RolloutNode(rollout_id=1, node_id=node_id, wave=None if excluded else 0, position=place,
                                excluded=excluded, ever_on_target=False)
                )  # fmt: skip
        command.downgrade(config, "0012_client_errors")  # the schema before the column, with the rows in it
        migrations.upgrade(engine)
        with Session(engine) as session:
            rollout = session.get(Rollout, 1)
            assert rollout is not None
            state = state_of(rollout, session.query(RolloutNode).filter_by(rollout_id=1))
            assert {n: a.refused for n, a in state.nodes.items()} == {"n1": True, "n2": False, "n3": False}
            assert {n: a.excluded for n, a in state.nodes.items()} == words  # the words stay as they were
    finally:
        engine.dispose()


def test_a_bare_postgresql_url_means_psycopg_and_is_shown_without_its_password() -> None:
    engine = make_engine(f"postgresql://user:{SECRET}@db.example:5432/strata")
    assert engine.url.drivername == "postgresql+psycopg"
    assert SECRET not in repr(engine) + safe_url(engine.url)
    assert safe_url(f"postgres://user:{SECRET}@db.example/strata") == "postgres://user:***@db.example/strata"
    assert redact(f"it said {SECRET} twice: {SECRET}", engine.url) == "it said *** twice: ***"
    assert SECRET not in repr(ServerSettings(data_dir=Path("/nowhere"), db_url=str(engine.url)))
    engine.dispose()


def test_a_missing_driver_names_the_extra_and_not_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # what an install without strata[postgres] has
    with pytest.raises(ConfigError) as caught:
        make_engine(f"postgresql://user:{SECRET}@127.0.0.1:1/x")
    assert "pip install 'strata[postgres]'" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_an_unparsable_url_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        make_engine(f"postgresql://user:{SECRET}@127.0.0.1:notaport/x")
    assert SECRET not in str(caught.value)
    assert "does not parse" in str(caught.value)


def test_a_refused_login_is_a_store_error_without_the_password(postgres: PostgresCluster) -> None:
    engine = make_engine(postgres.url("postgres").replace(postgres.password, SECRET))
    try:
        with pytest.raises(StoreError) as caught:
            migrations.upgrade(engine)
    finally:
        engine.dispose()
    assert "password authentication failed" in str(caught.value)
    assert SECRET not in str(caught.value)


def _server_output(tmp_path: Path, db: str, *, prelude: str = "") -> tuple[int, str]:
    """Run `strata server --db DB` until it exits (each of these cannot start); its exit status and output."""
    code = f"import sys; {prelude}from strata.cli.app import main; sys.argv[0] = 'strata'; main()"
    argv = [sys.executable, "-c", code, "server", "--data-dir", str(tmp_path / "data"), "--port", "0", "--db", db]
    done = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    return done.returncode, (done.stdout + done.stderr).decode()


@pytest.mark.slow
def test_strata_server_never_shows_the_database_password(tmp_path: Path, postgres: PostgresCluster) -> None:
    wrong_password = postgres.url("postgres").replace(postgres.password, SECRET)
    no_psycopg = "sys.modules['psycopg'] = None; "
    cases = {
        "unreachable": (f"postgresql://user:{SECRET}@127.0.0.1:1/x", "", "Connection refused"),
        "unparsable": (f"postgresql://user:{SECRET}@127.0.0.1:notaport/x", "", "does not parse"),
        "no driver": (f"postgresql://user:{SECRET}@127.0.0.1:1/x", no_psycopg, "strata[postgres]"),
        "login refused": (wrong_password, "", "password authentication failed"),
    }
    for case, (url, prelude, reason) in cases.items():
        status, output = _server_output(tmp_path / case.replace(" ", "-"), url, prelude=prelude)
        assert status != 0, (case, output)
        assert reason in output, (case, output)
        assert SECRET not in output, (case, output)
        assert "Traceback" not in output, (case, output)  # one line, not a stack


def test_every_commit_is_durable_even_where_the_server_says_otherwise(postgres: PostgresCluster) -> None:
    # The test cluster runs with synchronous_commit = off (a common tuning). A node deletes what the control plane
    # acknowledged, so an acknowledged commit that PostgreSQL's crash takes back is telemetry lost for good (it was:
    # tests/e2e/test_postgres_restart.py lost 5-18% of a node's requests): strata's sessions turn it back on.
    assert postgres.psql("SHOW synchronous_commit").strip() == "off"
    engine = make_engine(postgres.url())
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
    finally:
        engine.dispose()


def test_a_session_stopped_inside_a_transaction_is_ended_by_postgresql(postgres: PostgresCluster) -> None:
    """A replica paused (or cut off) inside a transaction held its locks, the rollout lock among them, until
    PostgreSQL noticed: never while paused, about two hours after a partition; every other replica's rollout
    actions waited. strata's sessions let PostgreSQL end one idle inside a transaction after a minute and probe a
    silent client after 30 s. Shown here on a session of the same engine whose limit is lowered to a second."""
    engine = make_engine(postgres.url())
    try:
        with engine.connect() as connection:
            shown = {
                name: connection.exec_driver_sql(f"SHOW {name}").scalar()
                for name in ("idle_in_transaction_session_timeout", "tcp_keepalives_idle", "tcp_keepalives_count")
            }
        assert shown == {
            "idle_in_transaction_session_timeout": "1min",
            "tcp_keepalives_idle": "30",
            "tcp_keepalives_count": "3",
        }
        stuck = engine.connect()
        stuck.exec_driver_sql("SET idle_in_transaction_session_timeout TO '1s'")
        stuck.exec_driver_sql("BEGIN")
        stuck.exec_driver_sql("SELECT pg_advisory_xact_lock(42)")
        time.sleep(2.5)  # the holder says nothing more: PostgreSQL ends its session and the lock is free
        with engine.connect() as other:
            assert other.exec_driver_sql("SELECT pg_try_advisory_lock(42)").scalar() is True
        stuck.invalidate()
    finally:
        engine.dispose()
