"""A generation counter of the fleet's desired states, and the long-poll waiters it wakes.

Every committed write that can change any node's desired state bumps the generation (deployments, packages,
enrollment, label changes, revocation). Caches of desired states are keyed by it; a long poll waits for it to
move. Bumps come from worker threads, waiters live on the event loop, so waking goes through
`call_soon_threadsafe`.

Several `strata server` processes (replicas) may serve one fleet from one database: `SharedGeneration` makes the
feed fleet-wide. A bump wakes this process's waiters at once (the in-process fast path) and then advances the
`fleet_changes` row (and, on PostgreSQL, NOTIFYs in the same transaction). Each replica watches that row: over
LISTEN on PostgreSQL with psycopg 3 (a dedicated connection in a thread, with a slow poll as a safety net), by
polling it every `poll_s` on SQLite (one primary-key read). When it moved for a change made elsewhere, the
replica bumps its own generation, which drops its caches and wakes its long polls. Its own changes it
recognises by the values it wrote, so they do not wake its waiters twice. Caches not keyed by the generation (the
credentials `auth.Authenticator` has looked up) register in `on_foreign` to be checked first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Engine, create_engine, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from strata.control.db import FleetChange, open_existing, store_error
from strata.control.errors import StoreError
from strata.core.aio import wait_event

if TYPE_CHECKING:
    from strata.control.db import Database

log = logging.getLogger(__name__)

CHANNEL: Final = "strata_fleet_changes"  # the PostgreSQL NOTIFY channel

_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _wake_many(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class ChangeFeed:
    """The generation counter and its waiters. Thread-safe; `wait_beyond` runs on an event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        self._closed = False
        self._waiters: set[_Waiter] = set()
        # Called after every `bump` (outside the lock): `SharedGeneration.publish` tells the other replicas.
        self.on_bump: Callable[[], None] | None = None

    @property
    def generation(self) -> int:
        """The current generation; it only grows."""
        return self._generation

    @property
    def closed(self) -> bool:
        """True once the server is shutting down: waits end at once."""
        return self._closed

    def bump(self) -> int:
        """Advance the generation and wake every waiter; call it after the write has committed. Other replicas
        hear of it through `on_bump`."""
        generation = self.bump_local()
        if self.on_bump is not None:
            self.on_bump()
        return generation

    def bump_local(self) -> int:
        """Advance the generation and wake this process's waiters only (a change another replica made)."""
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
        # A timer that resolves the future, not asyncio.wait_for: a deploy wakes every long poll of the fleet at
        # once, and wait_for's extra callbacks and cancellation per waiter were a tenth of that burst's CPU.
        timer = loop.call_later(timeout, _wake, future)
        try:
            await future
        finally:
            timer.cancel()
            with self._lock:
                self._waiters.discard((loop, future))
        return self._generation

    @staticmethod
    def _wake_all(waiters: set[_Waiter]) -> None:
        # One call into each event loop for all of its waiters: call_soon_threadsafe writes to the loop's wake-up
        # pipe, and 10,000 long polls woken one call each were 10,000 system calls.
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, future in waiters:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake_many, futures)


class ThrottledBump:
    """`feed.bump` at most once per `interval_s` (time.monotonic): the first call bumps at once, later ones within
    the interval make one bump at its end, so no change is left unannounced.

    For the bumps a node can cause by itself (its attestation verdict changing): each wakes every long poll of the
    fleet and makes every node's desired state be computed again, so a node flipping its verdict in a loop would
    cost the control plane a fleet's work per flip.
    """

    def __init__(self, feed: ChangeFeed, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._feed = feed
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._pending = False

    def __call__(self) -> None:
        with self._lock:
            if self._pending:
                return  # the bump at the end of this interval announces this change too
            now = self._clock()
            now_bump = self._last is None or now - self._last >= self._interval_s
            if now_bump:
                self._last = now
            else:
                assert self._last is not None
                self._pending = True
                timer = threading.Timer(self._last + self._interval_s - now, self._fire)
                timer.daemon = True
                timer.start()
        if now_bump:
            self._feed.bump()

    def _fire(self) -> None:
        with self._lock:
            self._pending = False
            self._last = self._clock()
        self._feed.bump()


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
        await wait_event(self._event, timeout)
        nudged = self._pending.is_set()
        self._pending.clear()
        self._event.clear()
        return nudged


# --- fleet-wide: the change counter every replica advances and watches ----------------------------------------


class SharedGeneration:
    """Makes a `ChangeFeed` fleet-wide through the `fleet_changes` row (see the module docstring).

    `start()` after the migrations ran; `stop()` at shutdown. Thread-safe.
    """

    # Values of other replicas' changes this far past the last one seen are not checked one by one.
    _MAX_GAP: Final = 10_000

    def __init__(self, db: Database, feed: ChangeFeed, poll_s: float = 0.2, safety_poll_s: float = 2.0) -> None:
        self._db = db
        self._feed = feed
        self.poll_s = poll_s
        self.safety_poll_s = safety_poll_s
        self._lock = threading.Lock()
        self._seen = 0
        self._own: set[int] = set()
        self._unpublished = False
        self._stop = threading.Event()
        self._listening = threading.Event()  # the watcher's LISTEN is in place (PostgreSQL)
        self._thread: threading.Thread | None = None
        # The watcher reads through an engine of its own (one pooled connection): a fixed cost per replica, apart
        # from the pool that serves requests.
        self._watch_engine: Engine | None = None
        self.foreign_changes = 0  # how many times another replica's change woke this one (for tests and metrics)
        # Called (in the watcher thread) when another replica's change is seen, before this process's feed moves.
        self.on_foreign: list[Callable[[], None]] = []

    @property
    def listens(self) -> bool:
        """Whether changes arrive by PostgreSQL NOTIFY (psycopg 3) rather than by polling."""
        dialect = self._db.engine.dialect
        return dialect.name == "postgresql" and dialect.driver == "psycopg"

    def start(self) -> None:
        """Read where the counter stands, hook the feed's bumps, and start watching.

        Raises:
            StoreError: the database failed.
        """
        self._watch_engine = create_engine(self._db.engine.url, pool_size=1, max_overflow=1)
        open_existing(self._watch_engine)
        self._seen = self._read()
        self._feed.on_bump = self.publish
        watch = self._listen_forever if self.listens else self._poll_forever
        self._thread = threading.Thread(target=watch, name="strata-fleet-changes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching: at once, or within two seconds when the database cannot be reached."""
        self._feed.on_bump = None
        self._stop.set()
        if self._thread is not None:
            if self._listening.is_set():  # in a thread of its own: a database gone quiet cannot hold the stop
                threading.Thread(target=self._wake_listener, name="strata-fleet-changes-wake", daemon=True).start()
            self._thread.join(2.0)
        if self._watch_engine is not None:
            self._watch_engine.dispose()

    def _wake_listener(self) -> None:
        """NOTIFY the channel with an empty payload, so that the LISTEN thread's wait ends now rather than at its
        one-second timeout (every server stop, and every test on PostgreSQL, waited for it). Every replica hears
        it and ignores it: it is not a counter value. Best effort: without the database, the timeout ends it."""
        engine = self._watch_engine
        if engine is None:  # never listened: nothing to wake
            return
        with contextlib.suppress(SQLAlchemyError), engine.connect() as connection:
            connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
            connection.commit()

    def publish(self) -> None:
        """Advance the counter after a change this replica committed (NOTIFY in the same transaction on
        PostgreSQL). A failure is logged and retried by the watcher: the change is stored, only the others' wake-up
        waits.

        The new value is noted as this replica's own before the commit (its NOTIFY may arrive at once), and
        forgotten again if the commit fails.
        """
        value: int | None = None
        try:
            with self._db.transaction() as session:
                session.execute(
                    update(FleetChange).where(FleetChange.id == 1).values(generation=FleetChange.generation + 1)
                )
                value = session.scalar(select(FleetChange.generation).where(FleetChange.id == 1))
                if value is None:
                    raise StoreError("the fleet_changes row is missing")
                with self._lock:
                    if value > self._seen:
                        self._own.add(value)
                if session.get_bind().dialect.name == "postgresql":
                    session.execute(
                        text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": str(value)}
                    )
        except StoreError as exc:
            log.warning("cannot tell the other replicas of a change, will retry: %s", exc)
            with self._lock:
                self._unpublished = True
                if value is not None:
                    self._own.discard(value)
            return
        with self._lock:
            self._unpublished = False

    def observe(self, value: int) -> bool:
        """Take note that the counter stands at `value`; when a replica other than this one advanced it since the
        last look, bump this process's feed. Return whether it did."""
        with self._lock:
            if value <= self._seen:
                return False
            if value - self._seen > self._MAX_GAP:
                foreign = True
            else:
                foreign = any(g not in self._own for g in range(self._seen + 1, value + 1))
            self._own = {g for g in self._own if g > value}
            self._seen = value
        if foreign:
            self.foreign_changes += 1
            for forget in self.on_foreign:
                forget()
            self._feed.bump_local()
        return foreign

    def _read(self) -> int:
        """Raises:
        StoreError: the database failed, or the row is missing.
        """
        engine = self._watch_engine or self._db.engine
        try:
            with engine.connect() as connection:
                value = connection.execute(select(FleetChange.generation).where(FleetChange.id == 1)).scalar()
        except SQLAlchemyError as exc:
            raise store_error(exc, engine.url) from exc
        if value is None:
            raise StoreError("the fleet_changes row is missing (run the migrations)")
        return int(value)

    def _retry_publish(self) -> None:
        with self._lock:
            unpublished = self._unpublished
        if unpublished:
            self.publish()

    def _poll_forever(self) -> None:
        failing = False
        while not self._stop.wait(self.poll_s):
            try:
                self.observe(self._read())
                self._retry_publish()
            except StoreError as exc:
                if not failing:
                    log.warning("cannot read the fleet change counter, will retry: %s", exc)
                failing = True
                continue
            if failing:
                log.info("reading the fleet change counter again")
                failing = False

    def _listen_forever(self) -> None:
        """LISTEN on a dedicated connection; after every (re)connection, and every `safety_poll_s` without a
        notification, read the counter too (a notification lost while disconnected is caught up that way)."""
        while not self._stop.is_set():
            try:
                connection = _listen_connection(self._db.engine)
            except Exception as exc:  # psycopg, OS and DNS errors alike: retry
                log.warning("cannot LISTEN for fleet changes, will retry: %s", _redacted(exc))
                self._stop.wait(1.0)
                continue
            try:
                connection.execute(f"LISTEN {CHANNEL}")
                self._listening.set()
                self.observe(self._read())
                heard = time.monotonic()  # the last notification, or the last read of the counter
                while not self._stop.is_set():
                    for notification in connection.notifies(timeout=1.0):  # a second at most: `stop` stays prompt
                        if self._stop.is_set():  # `stop` woke it
                            break
                        with contextlib.suppress(ValueError):
                            self.observe(int(notification.payload))
                        heard = time.monotonic()
                    self._retry_publish()
                    if time.monotonic() - heard >= self.safety_poll_s:
                        self.observe(self._read())
                        heard = time.monotonic()
            except Exception as exc:  # a broken connection of any kind: reconnect
                if not self._stop.is_set():
                    log.warning("lost the LISTEN connection for fleet changes, reconnecting: %s", _redacted(exc))
                    self._stop.wait(0.5)
            finally:
                self._listening.clear()
                with contextlib.suppress(Exception):
                    connection.close()


def _listen_connection(engine: Engine) -> Any:
    """A psycopg 3 connection in autocommit mode, made from the engine's own connect arguments."""
    import psycopg

    args, kwargs = engine.dialect.create_connect_args(engine.url)
    return psycopg.connect(*args, **{**kwargs, "autocommit": True, "connect_timeout": 5})


def _redacted(exc: BaseException) -> str:
    """An error's type and message, without anything that looks like a connection string's password."""
    import re

    return re.sub(r"(password\s*=\s*|://[^:/@\s]+:)[^@\s]+", r"\1***", f"{type(exc).__name__}: {exc}")
