"""`wait_event`: an event or a timeout, and a cancellation that arrives in the same turn as the event still ends
the task (`asyncio.wait_for` on Python 3.11 loses it: a task looping on it then never stops, and the control
plane's shutdown, which awaits its rollout driver, hung)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from strata.control.feed import Nudge
from strata.core.aio import wait_any, wait_event


def test_it_returns_whether_the_event_was_set() -> None:
    async def scenario() -> tuple[bool, bool, bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        no_wait = await wait_event(event, 0)
        asyncio.get_running_loop().call_later(0.01, event.set)
        woken = await wait_event(event, None)
        already = await wait_event(event, 0)
        return timed_out, no_wait, woken, already

    assert asyncio.run(scenario()) == (False, False, True, True)


async def _stops_when_cancelled_as_it_wakes(
    wait_once: Callable[[], Awaitable[object]], wake: Callable[[], None]
) -> bool:
    """Start a task looping on `wait_once()`, wake its wait and cancel the task in the same turn of the loop;
    whether the task ended within a second."""

    async def loop_forever() -> None:
        while True:
            await wait_once()

    task = asyncio.create_task(loop_forever())
    await asyncio.sleep(0)  # it is waiting now
    wake()  # schedules the wake-up for the next turn
    await asyncio.sleep(0)  # the wake-up ran: the waiting task's next step is scheduled, and now it is cancelled
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    stopped = task.done()
    task.cancel()  # a task that lost its cancellation: cancel it again so that the loop can close
    return stopped


@pytest.mark.parametrize("timeout", [5.0, None])
def test_a_cancellation_in_the_turn_the_event_is_set_ends_a_looping_task(timeout: float | None) -> None:
    async def scenario() -> bool:
        event = asyncio.Event()

        async def wait_once() -> None:
            await wait_event(event, timeout)
            event.clear()

        loop = asyncio.get_running_loop()
        return await _stops_when_cancelled_as_it_wakes(wait_once, lambda: loop.call_soon(event.set))

    assert asyncio.run(scenario())


def test_the_rollout_driver_stops_when_cancelled_as_a_status_report_nudges_it() -> None:
    async def scenario() -> bool:
        nudge = Nudge()
        nudge.attach(asyncio.get_running_loop())
        return await _stops_when_cancelled_as_it_wakes(lambda: nudge.wait(5.0), nudge)

    assert asyncio.run(scenario())


def test_wait_any_returns_when_either_event_is_set_and_leaves_no_waiter_behind() -> None:
    async def scenario() -> tuple[bool, bool, bool, int]:
        first, second = asyncio.Event(), asyncio.Event()
        timed_out = await wait_any((first, second), 0.01)
        asyncio.get_running_loop().call_later(0.01, second.set)
        woken = await wait_any((first, second), None)
        already = await wait_any((first, second), 0)
        await asyncio.sleep(0)  # the cancelled waiters finish
        return timed_out, woken, already, len(asyncio.all_tasks())

    assert asyncio.run(scenario()) == (False, True, True, 1)


def test_a_cancellation_in_the_turn_one_event_is_set_ends_a_task_looping_on_wait_any() -> None:
    async def scenario() -> bool:
        event, other = asyncio.Event(), asyncio.Event()

        async def wait_once() -> None:
            await wait_any((event, other), 5.0)
            event.clear()

        loop = asyncio.get_running_loop()
        return await _stops_when_cancelled_as_it_wakes(wait_once, lambda: loop.call_soon(event.set))

    assert asyncio.run(scenario())
