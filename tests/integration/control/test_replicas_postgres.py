"""The PostgreSQL side of replicas, on a throwaway cluster this test starts (initdb + pg_ctl from Debian's
package, as the `postgres` user when run as root): a change through one replica reaches another by LISTEN/NOTIFY,
leases have one holder, and serialized transactions take turns."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text, update

from strata.control import migrations
from strata.control.db import Database, FleetChange, make_engine
from strata.control.feed import CHANNEL, ChangeFeed, SharedGeneration
from strata.control.lease import LeaseStore, serialize

PG_BIN = Path(os.environ.get("STRATA_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL is not installed ({PG_BIN}/initdb is missing): apt-get install -y postgresql")
    # A folder of its own under the system temp folder: pytest's are private to root, and the cluster runs as
    # `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="strata-pg-"))
    data = folder / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "strata"], check=True,
                   capture_output=True)  # fmt: skip
    started = subprocess.run(
        [*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
         f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
        capture_output=True, text=True,
    )  # fmt: skip
    if started.returncode != 0:
        pytest.fail(f"PostgreSQL did not start: {started.stderr}{(folder / 'log').read_text(errors='replace')}")
    try:
        yield f"postgresql+psycopg://strata@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def two_databases(postgres_url: str) -> Iterator[tuple[Database, Database]]:
    engine = make_engine(postgres_url)
    migrations.upgrade(engine)
    engine.dispose()
    first, second = Database(make_engine(postgres_url)), Database(make_engine(postgres_url))
    yield first, second
    first.close()
    second.close()


def _wait_listening(database: Database, listeners: int) -> None:
    """Until `listeners` connections have run LISTEN on the fleet-changes channel (their last statement)."""
    query = text("SELECT count(*) FROM pg_stat_activity WHERE query = :listen")
    deadline = time.monotonic() + 30
    while True:
        with database.engine.connect() as connection:
            if connection.execute(query, {"listen": f"LISTEN {CHANNEL}"}).scalar() == listeners:
                return
        assert time.monotonic() < deadline, "the replicas never listened"
        time.sleep(0.05)


def test_a_change_through_one_replica_reaches_the_other_by_notify(two_databases: tuple[Database, Database]) -> None:
    feed_a, feed_b = ChangeFeed(), ChangeFeed()
    # A slow safety poll: only NOTIFY can wake b within the second.
    shared_a = SharedGeneration(two_databases[0], feed_a, safety_poll_s=30)
    shared_b = SharedGeneration(two_databases[1], feed_b, safety_poll_s=30)
    assert shared_b.listens
    shared_a.start()
    shared_b.start()
    try:
        _wait_listening(two_databases[0], 2)

        async def wait_on_b() -> float:
            seen = feed_b.generation
            started = time.monotonic()
            threading.Timer(0.2, feed_a.bump).start()
            assert await feed_b.wait_beyond(seen, timeout=5) > seen
            return time.monotonic() - started

        assert asyncio.run(wait_on_b()) < 3.0  # the NOTIFY, not the 30 s safety poll (slack for a busy machine)
        time.sleep(0.3)
        assert shared_a.foreign_changes == 0
        assert shared_b.foreign_changes == 1
    finally:
        shared_a.stop()
        shared_b.stop()


def test_a_change_whose_notification_was_lost_is_read_by_the_safety_poll(
    two_databases: tuple[Database, Database],
) -> None:
    """A change committed without its NOTIFY (as one is, to a replica whose LISTEN connection was down then) reaches
    the replica by its safety poll, after `safety_poll_s` without a notification."""
    feed = ChangeFeed()
    shared = SharedGeneration(two_databases[1], feed, safety_poll_s=2.0)
    shared.start()
    try:
        _wait_listening(two_databases[0], 1)
        advance = update(FleetChange).where(FleetChange.id == 1).values(generation=FleetChange.generation + 1)
        with two_databases[0].transaction() as session:
            session.execute(advance)

        async def wait_for_the_change() -> float:
            seen = feed.generation
            started = time.monotonic()
            assert await feed.wait_beyond(seen, timeout=30) > seen
            return time.monotonic() - started

        assert asyncio.run(wait_for_the_change()) < 10  # read within 2-3 s of the last one
        assert shared.foreign_changes == 1
    finally:
        shared.stop()


def test_one_holder_per_lease_and_serialized_turns(two_databases: tuple[Database, Database]) -> None:
    first, second = two_databases
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def contend(database: Database, name: str) -> None:
        barrier.wait()
        results.append(LeaseStore(database, time.time).try_hold("pg-job", name, 10))

    threads = [threading.Thread(target=contend, args=(db, f"replica-{i}")) for i, db in enumerate(two_databases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, True]

    inside = threading.Event()
    order: list[str] = []

    def hold() -> None:
        with first.transaction() as session:
            serialize(session, "pg-job")
            inside.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(5)
    with second.transaction() as session:
        serialize(session, "pg-job")
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_replica_stops_listening_at_once_and_the_other_ignores_its_wake_up(
    two_databases: tuple[Database, Database],
) -> None:
    """`stop` wakes its own LISTEN wait by a NOTIFY with no counter in it: every server stop (and every test on
    PostgreSQL) waited out the listener's one-second timeout before. The other replica hears it and moves nothing."""
    shared_a = SharedGeneration(two_databases[0], ChangeFeed(), safety_poll_s=30)
    shared_b = SharedGeneration(two_databases[1], ChangeFeed(), safety_poll_s=30)
    shared_a.start()
    shared_b.start()
    try:
        _wait_listening(two_databases[0], 2)
        started = time.monotonic()
        shared_a.stop()
        assert time.monotonic() - started < 0.9  # the listener's own wait is a second (slack for a busy machine)
        _wait_listening(two_databases[0], 1)
        time.sleep(0.3)
        assert (shared_a.foreign_changes, shared_b.foreign_changes) == (0, 0)
    finally:
        shared_a.stop()
        shared_b.stop()
