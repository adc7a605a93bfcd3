"""Leases for jobs that run on one replica at a time, and the fleet-wide change counter, over one SQLite file:
the pure rules with a fake clock, then the database drivers as two replicas would use them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.control import migrations
from strata.control.db import Database, make_engine
from strata.control.feed import ChangeFeed, SharedGeneration
from strata.control.lease import LeaseKeeper, LeaseRow, LeaseStore, LeaseTimer, may_take, serialize


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'strata.db'}"
    engine = make_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def two_databases(database_url: str) -> Iterator[tuple[Database, Database]]:
    """Two replicas' views of one database: two engines, as two processes would have."""
    first, second = Database(make_engine(database_url)), Database(make_engine(database_url))
    yield first, second
    first.close()
    second.close()


def test_may_take_a_free_an_expired_or_its_own_lease_only() -> None:
    assert may_take(None, "a", 100.0)
    assert may_take(LeaseRow("a", 110.0), "a", 100.0)
    assert not may_take(LeaseRow("b", 110.0), "a", 100.0)
    assert may_take(LeaseRow("b", 100.0), "a", 100.0)


def test_a_holder_stops_a_margin_before_the_lease_expires_and_renews_in_time() -> None:
    clock = FakeClock()
    timer = LeaseTimer(ttl_s=10, renew_s=3, margin_s=2, clock=clock)
    assert timer.due()
    assert not timer.held()
    timer.attempted(True, clock())
    assert timer.held()
    assert not timer.due()
    clock.advance(3)
    assert timer.due()
    assert timer.held()
    timer.failed(clock())  # the database did not answer: still held on the last confirmation...
    clock.advance(4.9)
    assert timer.held()
    clock.advance(0.2)  # ...until ttl - margin after it
    assert not timer.held()
    timer.attempted(True, clock())
    assert timer.held()
    timer.attempted(False, clock())  # another replica has it
    assert not timer.held()
    with pytest.raises(ValueError, match="renewed well before"):
        LeaseTimer(ttl_s=10, renew_s=9, margin_s=2)


def test_one_replica_holds_a_lease_and_another_takes_it_over_when_it_expires(
    two_databases: tuple[Database, Database],
) -> None:
    clock = FakeClock()
    a, b = LeaseStore(two_databases[0], clock), LeaseStore(two_databases[1], clock)
    assert a.try_hold("job", "replica-a", 10)
    assert not b.try_hold("job", "replica-b", 10)
    clock.advance(5)
    assert a.try_hold("job", "replica-a", 10)  # renewed until 1015
    clock.advance(9)
    assert not b.try_hold("job", "replica-b", 10)
    clock.advance(1)  # replica a stopped renewing: expired at 1015
    assert b.try_hold("job", "replica-b", 10)
    assert not a.try_hold("job", "replica-a", 10)
    assert a.get("job") == LeaseRow("replica-b", 1025.0)
    b.release("job", "replica-b")
    assert a.try_hold("job", "replica-a", 10)


def test_replicas_racing_for_a_new_lease_get_one_holder(database_url: str) -> None:
    databases = [Database(make_engine(database_url)) for _ in range(6)]
    results: list[bool] = []
    barrier = threading.Barrier(len(databases))

    def contend(index: int) -> None:
        barrier.wait()
        results.append(LeaseStore(databases[index], time.time).try_hold("new-job", f"replica-{index}", 10))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(databases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for database in databases:
        database.close()
    assert sorted(results) == [False] * 5 + [True]


def test_a_keeper_renews_only_when_due(two_databases: tuple[Database, Database]) -> None:
    monotonic = FakeClock()
    store = LeaseStore(two_databases[0], time.time)
    keeper = LeaseKeeper(store, "job", "replica-a", LeaseTimer(10, 3, 2, clock=monotonic))
    assert keeper.keep()
    assert keeper.held()
    first = store.get("job")
    assert first is not None
    monotonic.advance(1)
    assert keeper.keep()
    assert store.get("job") == first  # not due: no database write
    monotonic.advance(3)
    assert keeper.keep()
    keeper.release()
    assert not keeper.held()
    released = store.get("job")
    assert released is not None
    assert released.expires_at == 0.0


def test_serialized_transactions_take_turns_across_replicas(two_databases: tuple[Database, Database]) -> None:
    first, second = two_databases
    inside = threading.Event()
    order: list[str] = []

    def hold() -> None:
        with first.transaction() as session:
            serialize(session, "job")
            inside.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(5)
    with second.transaction() as session:
        serialize(session, "job")  # waits for the first transaction to end
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_a_change_on_one_replica_wakes_a_long_poll_on_the_other(two_databases: tuple[Database, Database]) -> None:
    feed_a, feed_b = ChangeFeed(), ChangeFeed()
    shared_a = SharedGeneration(two_databases[0], feed_a, poll_s=0.05)
    shared_b = SharedGeneration(two_databases[1], feed_b, poll_s=0.05)
    shared_a.start()
    shared_b.start()
    try:

        async def wait_on_b() -> float:
            seen = feed_b.generation
            started = time.monotonic()
            threading.Timer(0.2, feed_a.bump).start()  # a change committed through replica a
            assert await feed_b.wait_beyond(seen, timeout=5) > seen
            return time.monotonic() - started

        assert asyncio.run(wait_on_b()) < 3.0  # the 0.05 s poll, with slack for a busy machine (the wait is 5 s)
        # Replica a recognises its own change: its waiters woke once, at the bump, not again from the counter.
        time.sleep(0.3)
        assert feed_a.generation == 1
        assert shared_a.foreign_changes == 0
        assert shared_b.foreign_changes == 1
    finally:
        shared_a.stop()
        shared_b.stop()


def test_observe_bumps_only_for_other_replicas_changes(two_databases: tuple[Database, Database]) -> None:
    feed = ChangeFeed()
    shared = SharedGeneration(two_databases[0], feed)
    shared.publish()  # ours: 1
    assert not shared.observe(1)
    assert feed.generation == 0
    shared.publish()  # ours: 2; then another replica's: 3
    assert shared.observe(3)
    assert feed.generation == 1
    assert not shared.observe(2)  # already seen
