"""asyncio helpers every long-running task of strata uses.

`wait_event` instead of `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11, `wait_for` returns the inner
result when the task running it is cancelled in the same turn of the loop that the inner wait completes (CPython
gh-86296, fixed in 3.12), so the cancellation is lost. A task that loops on such a wait ("wake on a nudge or every
few seconds") then keeps running after `cancel()`, and a shutdown that awaits it hangs: the control plane's
lifespan hung this way when a status report nudged its rollout driver just as the server stopped.
`asyncio.timeout` delivers both the timeout and an outside cancellation.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

_T = TypeVar("_T")


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until `event` is set or `timeout` seconds pass (None or infinity: no limit; zero or less: do not wait);
    return whether it is set. A cancellation of the calling task always propagates."""
    if event.is_set():
        return True
    if timeout is not None and timeout <= 0:
        return False
    try:
        async with asyncio.timeout(None if timeout is None or math.isinf(timeout) else timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def wait_any(events: Sequence[asyncio.Event], timeout: float | None) -> bool:
    """Wait until one of `events` is set or `timeout` seconds pass (as `wait_event`); return whether one is set.
    A cancellation of the calling task always propagates."""
    if any(event.is_set() for event in events):
        return True
    if timeout is not None and timeout <= 0:
        return False
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(
            waiters,
            timeout=None if timeout is None or math.isinf(timeout) else timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for waiter in waiters:
            waiter.cancel()
    return any(event.is_set() for event in events)


def run_serving(main: Coroutine[Any, Any, _T], loop: str = "uvloop") -> _T:
    """`asyncio.run(main)` on the event loop named `loop`: "uvloop" (libuv's, written in C; where it is not
    installed, asyncio's) or "asyncio". A serving process's loop, where each request takes a few turns of it:
    uvloop's serves +12% requests per second on the digits model (`bench/serving.py`) and costs 1.4 MB resident
    (`bench/agent_footprint.py`)."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)
