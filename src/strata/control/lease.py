"""Leases: a job that must run on one replica at a time (the rollout driver) is held through a row of `leases`.

Any number of `strata server` processes may share one database. A lease is a row (name, holder, expires_at): a
replica takes it when nobody holds it or the holder let it expire, and renews it well before it expires; a replica
that dies stops renewing, and another takes it over once the TTL has passed. Taking and renewing is one conditional
UPDATE (`UPDATE leases ... WHERE name = :name AND (holder = :me OR expires_at <= :now)`), so two replicas never
both succeed; the first use INSERTs the row, and the loser of that race sees the unique violation and does not hold.

The pure part (`may_take`, `LeaseTimer`) decides; `LeaseStore` is the thin driver over the database. A holder
stops acting on its lease a margin before the database would let another replica take it, measured on its own
monotonic clock from the moment the database confirmed it, so a holder whose renewals stall (a slow database, a
paused process) gives up before anyone else can start.

Leases choose who runs a job; they are not what keeps its writes right. Every rollout step also runs in a
transaction that begins by `serialize`-ing on the job's name (a PostgreSQL transaction advisory lock; SQLite's
database write lock), so two steps, whichever replicas run them, never plan from the same state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from strata.control.db import Database, Lease
from strata.control.errors import StoreError
from strata.core.errors import Conflict

log = logging.getLogger(__name__)

ROLLOUTS: Final = "rollouts"  # the rollout driver's lease
TTL_S: Final = 10.0
RENEW_S: Final = 3.0
MARGIN_S: Final = 2.0  # the holder stops this long before the database lets another replica take over


def replica_id() -> str:
    """A name for this process that no other replica shares: host, pid and a random suffix."""
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LeaseRow:
    """A stored lease."""

    holder: str
    expires_at: float


def may_take(row: LeaseRow | None, me: str, now: float) -> bool:
    """Whether `me` may take (or renew) a lease: nobody holds it, its holder let it expire, or `me` holds it.

    The same rule as `LeaseStore.try_hold`'s WHERE clause, which is what decides atomically."""
    return row is None or row.holder == me or row.expires_at <= now


class LeaseTimer:
    """A holder's own view of its lease, on a monotonic clock: held until `ttl - margin` after the database last
    confirmed it, and due for renewal every `renew_s`. Pure: the clock is passed in."""

    def __init__(
        self,
        ttl_s: float = TTL_S,
        renew_s: float = RENEW_S,
        margin_s: float = MARGIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < renew_s < ttl_s - margin_s:
            raise ValueError("a lease must be renewed well before it expires (renew < ttl - margin)")
        self.ttl_s = ttl_s
        self.renew_s = renew_s
        self.margin_s = margin_s
        self._clock = clock
        self._confirmed: float | None = None
        self._attempted: float | None = None

    def attempted(self, confirmed: bool, started: float) -> None:
        """Record a take/renew attempt that began at `started` (this clock): a confirmation counts from then,
        since the database wrote `now + ttl` no earlier; a refusal drops the lease at once."""
        self._attempted = started
        self._confirmed = started if confirmed else None

    def failed(self, started: float) -> None:
        """Record an attempt that got no answer: the lease, if held, lasts until its confirmation runs out."""
        self._attempted = started

    def lost(self) -> None:
        """Forget the lease (released, or the database said another replica holds it)."""
        self._confirmed = None

    def held(self) -> bool:
        """Whether this replica may act on the lease now."""
        return self._confirmed is not None and self._clock() < self._confirmed + self.ttl_s - self.margin_s

    def due(self) -> bool:
        """Whether it is time to take or renew the lease again."""
        return self._attempted is None or self._clock() >= self._attempted + self.renew_s

    def now(self) -> float:
        return self._clock()


class LeaseStore:
    """Leases in the database (see the module docstring). Times are the server clock's epoch seconds, which every
    replica must agree on to well within `MARGIN_S` (NTP)."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock

    def try_hold(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew lease `name` for `holder` until now + `ttl_s`; return whether `holder` holds it.

        Raises:
            StoreError: the database failed (the caller counts it as not held).
        """
        now = self._clock()
        with self._db.transaction() as session:
            taken = session.connection().execute(
                update(Lease)
                .where(Lease.name == name, (Lease.holder == holder) | (Lease.expires_at <= now))
                .values(holder=holder, expires_at=now + ttl_s)
            )
            if taken.rowcount == 1:
                return True
            if session.scalar(select(Lease.name).where(Lease.name == name)) is not None:
                return False
        try:
            with self._db.transaction() as session:
                session.add(Lease(name=name, holder=holder, expires_at=now + ttl_s))
        except Conflict:  # another replica inserted it first
            return False
        return True

    def release(self, name: str, holder: str) -> None:
        """Give lease `name` up, if `holder` has it, so that another replica takes it at its next attempt.

        Raises:
            StoreError: the database failed (the lease then expires by itself).
        """
        with self._db.transaction() as session:
            session.connection().execute(
                update(Lease).where(Lease.name == name, Lease.holder == holder).values(expires_at=0.0)
            )

    def get(self, name: str) -> LeaseRow | None:
        """The stored lease `name`, or None.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            row = session.get(Lease, name)
            return LeaseRow(row.holder, row.expires_at) if row is not None else None


class LeaseKeeper:
    """One lease of this replica, kept by `keep()` calls (every second or so, from a worker thread)."""

    def __init__(self, store: LeaseStore, name: str, holder: str, timer: LeaseTimer | None = None) -> None:
        self.store = store
        self.name = name
        self.holder = holder
        self.timer = timer or LeaseTimer()
        self._lock = threading.Lock()

    def held(self) -> bool:
        """Whether this replica may run the job now (no database call)."""
        return self.timer.held()

    def keep(self) -> bool:
        """Take or renew the lease when due; return whether it is held."""
        with self._lock:
            if not self.timer.due():
                return self.timer.held()
            was_held = self.timer.held()
            started = self.timer.now()
            try:
                confirmed = self.store.try_hold(self.name, self.holder, self.timer.ttl_s)
            except StoreError as exc:
                log.warning("cannot renew the %s lease: %s", self.name, exc)
                self.timer.failed(started)
                return self.timer.held()
            self.timer.attempted(confirmed, started)
            if confirmed and not was_held:
                log.info("this replica (%s) now runs the %s job", self.holder, self.name)
            elif was_held and not confirmed:
                log.warning("this replica (%s) lost the %s lease", self.holder, self.name)
            return confirmed

    def release(self) -> None:
        """Give the lease up (clean shutdown), so another replica takes over at once."""
        with self._lock:
            if self.timer.held():
                try:
                    self.store.release(self.name, self.holder)
                except StoreError as exc:
                    log.warning("cannot release the %s lease (it expires by itself): %s", self.name, exc)
            self.timer.lost()


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for `name` (PostgreSQL advisory locks take a bigint)."""
    return int.from_bytes(hashlib.sha256(f"strata:{name}".encode()).digest()[:8], "big", signed=True)


def serialize(session: Session, name: str) -> None:
    """Make the session's transaction the only one between here and its end that does job `name`'s work, across
    every replica: a transaction-scoped advisory lock on PostgreSQL; on SQLite a write, which takes the database's
    write lock at once (so the reads that follow see the latest commit and no other writer commits meanwhile).
    Call it first in the transaction.

    Raises:
        SQLAlchemyError: the database failed (inside `Database.transaction`, which wraps it).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(name)})
    else:
        session.execute(update(Lease).where(Lease.name == name).values(holder=Lease.holder))
