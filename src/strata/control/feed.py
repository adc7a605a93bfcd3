"""A generation counter of the fleet's desired states, and the long-poll waiters it wakes.

Every committed write that can change any node's desired state bumps the generation (deployments, packages,
enrollment, label changes, revocation). Caches of desired states are keyed by it; a long poll waits for it to
move. Bumps come from worker threads, waiters live on the event loop, so waking goes through
`call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ChangeFeed:
    """The generation counter and its waiters. Thread-safe; `wait_beyond` runs on an event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._closed = False
        self._waiters: set[_Waiter] = set()

    @property
    def generation(self) -> int:
        """The current generation; it only grows."""
        return self._generation

    @property
    def closed(self) -> bool:
        """True once the server is shutting down: waits end at once."""
        return self._closed

    def bump(self) -> int:
        """Advance the generation and wake every waiter; call it after the write has committed."""
        with self._lock:
            self._generation += 1
            waiters, self._waiters = self._waiters, set()
            generation = self._generation
        self._wake_all(waiters)
        return generation

    def close(self) -> None:
        """Wake every waiter and make later waits return immediately (server shutdown)."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = self._waiters, set()
        self._wake_all(waiters)

    async def wait_beyond(self, seen: int, timeout: float) -> int:
        """Wait until the generation is no longer `seen`, at most `timeout` seconds; return the generation then."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._generation != seen or self._closed:
                return self._generation
            self._waiters.add((loop, future))
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout)
        finally:
            with self._lock:
                self._waiters.discard((loop, future))
        return self._generation

    @staticmethod
    def _wake_all(waiters: set[_Waiter]) -> None:
        for loop, future in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, future)


class Nudge:
    """A wake-up call from any thread to one waiter on an event loop (status reports nudge the rollout driver).

    Calls before `attach` (or after the loop closed) are kept as a pending flag, so none is lost.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._pending = threading.Event()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver nudges to `wait` on `loop` from now on."""
        self._loop = loop
        self._event = asyncio.Event()
        if self._pending.is_set():
            self._event.set()

    def __call__(self) -> None:
        self._pending.set()
        loop, event = self._loop, self._event
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def wait(self, timeout: float) -> bool:
        """Wait until nudged or `timeout` seconds pass; return whether nudged (and clear it)."""
        if self._event is None:
            self.attach(asyncio.get_running_loop())
        assert self._event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        nudged = self._pending.is_set()
        self._pending.clear()
        self._event.clear()
        return nudged
