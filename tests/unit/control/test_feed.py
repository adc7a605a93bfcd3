"""The change feed: a bump from any thread wakes the long polls waiting on an event loop."""

from __future__ import annotations

import asyncio
import threading
import time

from strata.control.feed import ChangeFeed, ThrottledBump


def test_a_bump_from_another_thread_wakes_a_waiter_at_once() -> None:
    feed = ChangeFeed()

    async def wait() -> tuple[int, float]:
        started = time.monotonic()
        threading.Timer(0.1, feed.bump).start()
        generation = await feed.wait_beyond(0, timeout=10)
        return generation, time.monotonic() - started

    generation, seconds = asyncio.run(wait())
    assert generation == 1
    assert seconds < 2


def test_a_stale_generation_returns_without_waiting() -> None:
    feed = ChangeFeed()
    feed.bump()
    started = time.monotonic()
    assert asyncio.run(feed.wait_beyond(0, timeout=10)) == 1
    assert time.monotonic() - started < 1


def test_a_wait_times_out_and_leaves_no_waiter_behind() -> None:
    feed = ChangeFeed()
    started = time.monotonic()
    assert asyncio.run(feed.wait_beyond(0, timeout=0.1)) == 0
    assert 0.09 < time.monotonic() - started < 2
    assert feed._waiters == set()


def test_closing_ends_every_wait() -> None:
    feed = ChangeFeed()

    async def waits() -> list[int]:
        threading.Timer(0.1, feed.close).start()
        return list(await asyncio.gather(*(feed.wait_beyond(0, timeout=10) for _ in range(3))))

    started = time.monotonic()
    assert asyncio.run(waits()) == [0, 0, 0]
    assert time.monotonic() - started < 2
    assert feed.closed
    assert asyncio.run(feed.wait_beyond(0, timeout=10)) == 0


def test_a_throttled_bump_announces_at_once_then_once_at_the_end_of_its_interval() -> None:
    feed = ChangeFeed()
    bump = ThrottledBump(feed, 0.5)  # long enough for ten calls on a busy machine (0.05 s failed once in 1,500)
    for _ in range(10):
        bump()
    assert feed.generation == 1  # the first at once, the other nine wait for the interval's end
    deadline = time.monotonic() + 5
    while feed.generation < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.6)
    assert feed.generation == 2  # one bump announces all nine
    bump()  # a quiet interval has passed: at once again
    assert feed.generation == 3
