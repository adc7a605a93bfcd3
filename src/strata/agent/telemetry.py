"""Store-and-forward telemetry on the node: a SQLite (WAL) buffer with a disk budget, a group-commit
recorder, and an uploader that sends numbered, compressed batches until the control plane acknowledges them.

Durability: the inference server awaits `TelemetryRecorder.record` before it answers, and the recorder
commits outcomes in groups (group commit), so a request a client saw answered is on disk even if the agent is
killed the next instant. The outcomes recorded in one turn of the event loop are committed together at the end of
the turn: on the loop itself when that needs no wait (an append to the log), else by the writer thread (one
wake-up of it, and one of the loop when they are committed), which also keeps the buffer in its budget and its
log short. Exactly once: a batch is sealed into the
outbox with its sequence number in the same transaction that removes its rows, and is deleted only when the
server acknowledges that sequence; the server stores each (node, seq) once, so a resend after a kill is
harmless. A new buffer numbers its batches from the time it seals its first (`first_sequence`): after those of
any buffer the node had before.

Budget: when the buffer outgrows its disk budget it drops the oldest sampled events first, then slow-request
events, then error events, and aggregates last; every drop is counted and sent with the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import queue
import random
import sqlite3
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np

from strata.agent.metrics import MetricsRegistry
from strata.agent.serving import is_client_fault, is_shed
from strata.core.errors import StrataError
from strata.core.telemetry import (
    BUCKETS,
    DRIFT_MAX_ELEMENTS,
    DROPPED_KINDS,
    MAX_BATCH_DRIFT,
    MAX_BATCH_EVENTS,
    MAX_BATCH_MINUTES,
    PRIORITY_ERROR,
    PRIORITY_SAMPLED,
    PRIORITY_SLOW,
    DriftReference,
    DriftRow,
    EventRow,
    MinuteRow,
    TelemetryBatch,
    bin_counts,
    count_flat,
    encode_batch,
    event_priority,
    minute_of,
    psi,
)

log = logging.getLogger("strata.agent.telemetry")

_T = TypeVar("_T")

# A commit made on an event loop that took longer than this (a disk stalling its writes) sends the commits of the
# next INLINE_PAUSE_S to the writer thread: a slow disk then holds the answers waiting for their commit, not the loop
INLINE_SLOW_S: Final = 0.05
INLINE_PAUSE_S: Final = 10.0

# Drift counts are summed in memory and written at most this often (and before every seal): a per-minute figure
# needs no per-request write, and a kill loses at most this much of it
DRIFT_WRITE_S: Final = 1.0
# Values of a drift tensor a tap holds before it counts them (`DriftTap`): 64 rows of digits, 16 KiB of float32;
# and the most it holds over all its tensors (a package may reference many: those past it are counted at once)
DRIFT_BUFFER_ELEMENTS: Final = 4096
DRIFT_TAP_MAX_VALUES: Final = 16 * DRIFT_BUFFER_ELEMENTS

_BUCKET_COLUMNS = ", ".join(f"b{i}" for i in range(BUCKETS))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS minutes (
    model TEXT NOT NULL, version TEXT NOT NULL, variant TEXT NOT NULL, minute INTEGER NOT NULL,
    requests INTEGER NOT NULL, errors INTEGER NOT NULL, items INTEGER NOT NULL,
    latency_sum_us INTEGER NOT NULL, queue_sum_us INTEGER NOT NULL,
    {", ".join(f"b{i} INTEGER NOT NULL" for i in range(BUCKETS))},
    client_errors INTEGER NOT NULL DEFAULT 0,
    shed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (model, version, variant, minute)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL,
    variant TEXT NOT NULL, latency_us INTEGER NOT NULL, queue_us INTEGER NOT NULL, batch INTEGER NOT NULL,
    status TEXT NOT NULL, tier TEXT NOT NULL, priority INTEGER NOT NULL, summary TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_priority ON events (priority, id);
CREATE TABLE IF NOT EXISTS drift (
    model TEXT NOT NULL, version TEXT NOT NULL, minute INTEGER NOT NULL, tensor TEXT NOT NULL,
    counts TEXT NOT NULL, PRIMARY KEY (model, version, minute, tensor)
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY, created REAL NOT NULL, payload BLOB NOT NULL, requests INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_UPSERT_MINUTE = f"""
INSERT INTO minutes (model, version, variant, minute, requests, errors, client_errors, shed, items, latency_sum_us,
                     queue_sum_us, {_BUCKET_COLUMNS})
VALUES ({", ".join("?" * (11 + BUCKETS))})
ON CONFLICT (model, version, variant, minute) DO UPDATE SET
    requests = requests + excluded.requests, errors = errors + excluded.errors,
    client_errors = client_errors + excluded.client_errors, shed = shed + excluded.shed, items = items + excluded.items,
    latency_sum_us = latency_sum_us + excluded.latency_sum_us, queue_sum_us = queue_sum_us + excluded.queue_sum_us,
    {", ".join(f"b{i} = b{i} + excluded.b{i}" for i in range(BUCKETS))}
"""

# how long a write on the writer thread waits for another serving process's write to end
_BUSY_TIMEOUT_S: Final = 30
# the buffer is kept in its budget and its log short (`TelemetryBuffer.maintain`) every this many writes; the log is
# copied into the file once it is this large (SQLite's own default: 1000 pages of 4 KiB)
MAINTAIN_EVERY: Final = 64
WAL_CHECKPOINT_BYTES: Final = 4 << 20
# A log that a checkpoint emptied is written over from its start, its file cut down to this size, not to nothing:
# below this the file's size does not say how much the log holds, so a checkpoint is judged only above it
WAL_KEEP_BYTES: Final = 1 << 20

# (model, version, variant, minute)
MinuteKey = tuple[str, str, str, int]
# an answered request for `TelemetryRecorder.record_answers`: (its future, its answer, latency_us, queue_us, rows,
# what makes its summary if it is kept as an event)
RecordedAnswer = tuple[asyncio.Future[_T], _T, int, int, int, Callable[[], str] | None]
# drift counts summed by (model, version, minute, tensor)
DriftSums = dict[tuple[str, str, int, str], list[int]]
# (tensor, counts in its drift reference's bins)
DriftCounts = list[tuple[str, list[int]]]


class Busy(Exception):
    """Another connection holds the buffer's write lock, and the writer was told not to wait."""


@dataclass(frozen=True)
class TelemetryConfig:
    """Every telemetry setting and limit of a node."""

    path: Path
    budget_bytes: int = 64 << 20
    sample_rate: float = 0.01
    slow_us: float = 250_000.0
    upload_interval_s: float = 10.0
    batch_max_events: int = MAX_BATCH_EVENTS  # what the control plane takes in one batch (`decode_batch`)
    batch_max_minutes: int = MAX_BATCH_MINUTES
    drift_window_minutes: int = 10


@dataclass(slots=True)
class Outcome:
    """One inference request as the server saw it (not frozen: one is made per request, and a frozen
    dataclass's constructor costs four times as much)."""

    ts: float
    model: str
    version: str
    variant: str
    latency_us: int
    queue_us: int
    batch: int
    ok: bool
    status: str
    tier: str = "local"
    summary: str = ""
    # made only for outcomes kept as events (a few in a hundred), on the recorder's thread; wins over `summary`
    summarize: Callable[[], str] | None = None


@dataclass(frozen=True)
class BufferStats:
    minutes: int
    events: int
    outbox: int
    bytes_pending: int
    disk_bytes: int
    dropped: Mapping[str, int]
    last_upload: float | None
    uploaded_batches: int


class TelemetryBuffer:
    """The SQLite buffer. One thread at a time uses it: the recorder's writer thread, or an event loop committing
    its outcomes (`TelemetryRecorder._commit_here`); other threads go through `TelemetryRecorder.call`.

    Its connection is shared, so a statement another thread ran on it unserialized would hold a read snapshot
    inside the writer's work: when another serving process (another connection to the file) committed since that
    snapshot, the writer's BEGIN IMMEDIATE must upgrade a stale read and fails at once with "database is locked"
    (SQLITE_BUSY_SNAPSHOT, which no busy timeout waits out), and the outcomes of that commit were lost.
    """

    def __init__(self, path: Path, budget_bytes: int) -> None:
        """Open (or make) the buffer at `path`, bringing a file of an older agent to this schema.

        Raises:
            StrataError: it cannot be opened, made or upgraded (a full or read-only disk, a file that is not a
                database); the file is left as it was.
        """
        self.path = path
        self.budget_bytes = budget_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self._db = self._configure(db)
            self._db.executescript(_SCHEMA)
            self._upgrade()
        except sqlite3.Error as exc:  # it was a traceback from the agent's start
            if db is not None:
                db.close()
            raise StrataError(
                f"cannot open the telemetry buffer {path}: {exc} (a full or read-only disk? a file that is not a"
                " telemetry buffer can be moved aside: the agent makes a new one)"
            ) from exc
        self._wal = path.with_name(path.name + "-wal")
        self._writes = 0
        self._maintained = 0

    def _upgrade(self) -> None:
        """Bring a buffer made by an older agent (upgraded in place) to this schema: its `minutes` table lacks
        `client_errors` or `shed` (its rows count none apart). In one write transaction, so that the node's serving
        processes, which open the same file together, add each column once."""
        with self._transaction() as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(minutes)")}
            for column in ("client_errors", "shed"):
                if column not in columns:  # the name is one of the two above, never from outside
                    db.execute(f"ALTER TABLE minutes ADD COLUMN {column} INTEGER NOT NULL DEFAULT 0")

    @staticmethod
    def _configure(db: sqlite3.Connection) -> sqlite3.Connection:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a process kill loses no commit
        db.execute("PRAGMA cache_size=-512")  # 512 KiB: the agent has a memory budget
        db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        # checkpoints (copying the log into the file, and syncing both) are `maintain`'s, on the recorder's
        # writer thread: a commit made on the event loop never runs one
        db.execute("PRAGMA wal_autocheckpoint=0")
        return db

    # --- writing (recorder thread) ----------------------------------------------------------------------

    def write(
        self,
        outcomes: Sequence[Outcome],
        priorities: Sequence[int | None],
        drift: DriftSums | None = None,
        *,
        rows: Sequence[Mapping[MinuteKey, MinuteRow]] = (),
        lost: int = 0,
        wait: bool = True,
    ) -> None:
        """Add outcomes to the minute aggregates (all of them) and the events table (the kept ones: a priority),
        `rows` (outcomes already counted by minute and kept as no event, several waiters' each; left as they are)
        to the minute aggregates, `drift` (counts summed by model, version, minute and tensor) to the drift counts
        and `lost` to the outcomes counted lost, atomically. The writer keeps the buffer in its budget and its log
        short: `maintain`, when `maintenance_due` (every MAINTAIN_EVERY writes).

        Raises:
            Busy: not `wait`, and another connection (another serving process) is writing: nothing was written.
            sqlite3.Error: the disk is full or the file is damaged (the caller counts the loss).
        """
        with self._transaction(wait) as db:  # first: a Busy costs nothing (the events' summaries are made below)
            minutes: dict[MinuteKey, MinuteRow] = {}
            for counted in rows:
                for key, row in counted.items():
                    total = minutes.get(key)
                    if total is None:
                        total = minutes[key] = MinuteRow(*key)
                    total.add(row)
            events = []
            for outcome, priority in zip(outcomes, priorities, strict=True):
                count_outcome(minutes, outcome)
                if priority is not None:
                    events.append(
                        (outcome.ts, outcome.model, outcome.version, outcome.variant, outcome.latency_us,
                         outcome.queue_us, outcome.batch, outcome.status, outcome.tier, priority, _summary_of(outcome))
                    )  # fmt: skip
            if lost:
                self._bump(db, "dropped.lost", lost)
            db.executemany(
                _UPSERT_MINUTE,
                [
                    (
                        *key,
                        m.requests,
                        m.errors,
                        m.client_errors,
                        m.shed,
                        m.items,
                        m.latency_sum_us,
                        m.queue_sum_us,
                        *m.latency,
                    )
                    for key, m in minutes.items()
                ],
            )
            for drift_key, added in (drift or {}).items():
                stored = db.execute(
                    "SELECT counts FROM drift WHERE model=? AND version=? AND minute=? AND tensor=?", drift_key
                ).fetchone()
                if stored is not None:
                    previous = json.loads(stored[0])
                    if len(previous) == len(added):
                        added = [a + b for a, b in zip(previous, added, strict=True)]
                db.execute("INSERT OR REPLACE INTO drift VALUES (?, ?, ?, ?, ?)", (*drift_key, json.dumps(added)))
            if events:
                db.executemany(
                    "INSERT INTO events (ts, model, version, variant, latency_us, queue_us, batch, status, tier,"
                    " priority, summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    events,
                )
        self._writes += 1

    @property
    def maintenance_due(self) -> bool:
        return self._writes - self._maintained >= MAINTAIN_EVERY

    def maintain(self) -> None:
        """Drop what is over the budget (`enforce_budget`), and copy a log that has grown past WAL_CHECKPOINT_BYTES
        into the file (a passive checkpoint: it never waits for another connection). The first write after a
        checkpoint that emptied the log starts the log over and syncs its header: that write is made here too, so
        that it is not a commit on an event loop."""
        self._maintained = self._writes
        self.enforce_budget()
        try:
            log_bytes = self._wal.stat().st_size
        except FileNotFoundError:
            return
        if log_bytes >= WAL_CHECKPOINT_BYTES:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            with self._transaction() as db:
                self._bump(db, "checkpoints", 1)

    @contextlib.contextmanager
    def _transaction(self, wait: bool = True) -> Any:
        if wait:
            self._db.execute("BEGIN IMMEDIATE")  # waits out another connection's write (the busy timeout)
        else:
            self._db.execute("PRAGMA busy_timeout=0")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                    raise
                raise Busy("another connection is writing the telemetry buffer") from exc
            finally:
                self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error:
            if self._db.in_transaction:  # a COMMIT that failed (a full disk) leaves it open: every BEGIN would fail
                self._db.execute("ROLLBACK")
            raise

    def count_dropped(self, kind: str, amount: int) -> None:
        """Add to a dropped counter (sent with the next batch, then reset)."""
        if amount:
            with self._transaction() as db:
                self._bump(db, f"dropped.{kind}", amount)

    @staticmethod
    def _bump(db: sqlite3.Connection, key: str, amount: int) -> None:
        db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, amount),
        )

    def used_bytes(self) -> int:
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def enforce_budget(self) -> dict[str, int]:
        """Drop data, lowest priority and oldest first, until the buffer is under 90% of its budget.

        Returns what was dropped, by kind (also added to the dropped counters).
        """
        dropped: dict[str, int] = defaultdict(int)
        target = int(self.budget_bytes * 0.9)
        if self.used_bytes() <= self.budget_bytes:
            return dropped
        order = [
            (PRIORITY_SAMPLED, "events_sampled"),
            (PRIORITY_SLOW, "events_slow"),
            (PRIORITY_ERROR, "events_error"),
        ]
        for priority, kind in order:
            while self.used_bytes() > target:
                with self._transaction() as db:
                    removed = db.execute(
                        "DELETE FROM events WHERE id IN"
                        " (SELECT id FROM events WHERE priority=? ORDER BY id LIMIT 2000)",
                        (priority,),
                    ).rowcount
                    self._bump(db, f"dropped.{kind}", removed)
                dropped[kind] += removed
                if removed == 0:
                    break
        while self.used_bytes() > target:
            with self._transaction() as db:
                rows = db.execute("SELECT minute FROM minutes ORDER BY minute LIMIT 1").fetchone()
                if rows is None:
                    outbox = db.execute("SELECT seq, requests FROM outbox ORDER BY seq LIMIT 1").fetchone()
                    if outbox is None:
                        break
                    db.execute("DELETE FROM outbox WHERE seq=?", (outbox[0],))
                    self._bump(db, "dropped.minute_requests", outbox[1])
                    dropped["minute_requests"] += outbox[1]
                    continue
                oldest = rows[0]
                requests, count = db.execute(
                    "SELECT COALESCE(SUM(requests), 0), COUNT(*) FROM minutes WHERE minute=?", (oldest,)
                ).fetchone()
                db.execute("DELETE FROM minutes WHERE minute=?", (oldest,))
                db.execute("DELETE FROM drift WHERE minute=?", (oldest,))
                self._bump(db, "dropped.minutes", count)
                self._bump(db, "dropped.minute_requests", requests)
                dropped["minutes"] += count
                dropped["minute_requests"] += requests
        if dropped:
            log.warning("telemetry buffer over its %d-byte budget: dropped %s", self.budget_bytes, dict(dropped))
        return dropped

    def seal(self, node_id: str, now: float, max_events: int, max_minutes: int) -> int | None:
        """Move the oldest buffered data into one outbox batch; return its sequence number.

        Does nothing (returns the pending seq) while a batch waits for its acknowledgement, and returns None
        when there is nothing to send.
        """
        with self._transaction() as db:
            pending = db.execute("SELECT seq FROM outbox ORDER BY seq LIMIT 1").fetchone()
            if pending is not None:
                return int(pending[0])
            minutes = [
                MinuteRow(
                    model=r[0], version=r[1], variant=r[2], minute=r[3], requests=r[4], errors=r[5],
                    client_errors=r[6], shed=r[7], items=r[8], latency_sum_us=r[9], queue_sum_us=r[10],
                    latency=list(r[11:]),
                )
                for r in db.execute(
                    "SELECT model, version, variant, minute, requests, errors, client_errors, shed, items,"
                    f" latency_sum_us, queue_sum_us, {_BUCKET_COLUMNS} FROM minutes ORDER BY minute LIMIT ?",
                    (max_minutes,),
                )
            ]  # fmt: skip
            event_rows = db.execute(
                "SELECT id, ts, model, version, variant, latency_us, queue_us, batch, status, tier, priority, summary"
                " FROM events ORDER BY id LIMIT ?",
                (max_events,),
            ).fetchall()
            drift = [
                DriftRow(model=r[0], version=r[1], minute=r[2], tensor=r[3], counts=json.loads(r[4]))
                for r in db.execute(
                    "SELECT model, version, minute, tensor, counts FROM drift ORDER BY minute LIMIT ?",
                    (MAX_BATCH_DRIFT,),
                )
            ]
            dropped = {
                key.removeprefix("dropped."): value
                for key, value in db.execute("SELECT key, value FROM meta WHERE key LIKE 'dropped.%' AND value > 0")
            }
            if not minutes and not event_rows and not drift and not dropped:
                return None
            seq_row = db.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
            seq = int(seq_row[0]) if seq_row else first_sequence(now)
            batch = TelemetryBatch(
                node_id=node_id,
                seq=seq,
                created=now,
                minutes=minutes,
                events=[EventRow(*r[1:]) for r in event_rows],
                drift=drift,
                dropped=dropped,
            )
            payload = encode_batch(batch)
            db.execute("INSERT INTO outbox VALUES (?, ?, ?, ?)", (seq, now, payload, sum(m.requests for m in minutes)))
            for m in minutes:
                db.execute("DELETE FROM minutes WHERE model=? AND version=? AND variant=? AND minute=?", m.key)
            if event_rows:
                db.execute("DELETE FROM events WHERE id <= ?", (event_rows[-1][0],))
            db.executemany(
                "DELETE FROM drift WHERE model=? AND version=? AND minute=? AND tensor=?",
                [(row.model, row.version, row.minute, row.tensor) for row in drift],
            )
            db.execute("UPDATE meta SET value = 0 WHERE key LIKE 'dropped.%'")
            db.execute(
                "INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (seq + 1,),
            )
            return seq

    def ack(self, seq: int, now: float) -> None:
        """The server stored batch `seq`: forget it."""
        with self._transaction() as db:
            db.execute("DELETE FROM outbox WHERE seq=?", (seq,))
            db.execute(
                "INSERT INTO meta VALUES ('last_upload', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (int(now),),
            )
            self._bump(db, "uploaded_batches", 1)

    # --- reading (any thread) ---------------------------------------------------------------------------

    def read_outbox(self) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT seq, payload FROM outbox ORDER BY seq LIMIT 1").fetchone()
        return (int(row[0]), bytes(row[1])) if row else None

    def stats(self) -> BufferStats:
        db = self._db
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        outbox, outbox_bytes = db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM outbox").fetchone()
        minutes = db.execute("SELECT COUNT(*) FROM minutes").fetchone()[0]
        events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return BufferStats(
            minutes=minutes,
            events=events,
            outbox=outbox,
            bytes_pending=int(outbox_bytes),
            disk_bytes=self.used_bytes(),
            dropped={kind: int(meta.get(f"dropped.{kind}", 0)) for kind in DROPPED_KINDS},
            last_upload=float(meta["last_upload"]) if "last_upload" in meta else None,
            uploaded_batches=int(meta.get("uploaded_batches", 0)),
        )

    def close(self) -> None:
        self._db.close()


# --- the recorder: group commit ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiter:
    """The outcomes one turn of an event loop recorded, handed to the writer thread together: one queue item
    and one wake-up of the writer per turn, however many requests finished in it."""

    loop: asyncio.AbstractEventLoop | None  # None: nobody waits for the commit
    outcomes: list[Outcome] = field(default_factory=list)  # those kept as events
    priorities: list[int] = field(default_factory=list)  # theirs
    rows: dict[MinuteKey, MinuteRow] = field(default_factory=dict)  # the others, counted by minute
    # each future gets its value once the outcomes are committed
    futures: list[tuple[asyncio.Future[Any], Any]] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.outcomes) + sum(row.requests for row in self.rows.values())


@dataclass
class _Command:
    run: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class DriftTap:
    """Where the batches of one served model version count their drift (made by `TelemetryRecorder.drift_tap`).

    `add` takes a batch's values of each reference's tensor. Numeric values are copied into that reference's
    buffer and counted in its bins together, when the buffer has no room for more, when the minute changes, or
    when the recorder takes the counts (`take`: before it writes drift or reads the drift window). Counting is a
    handful of numpy calls whatever the size, and a batch of a few rows paid them for every tensor: about a tenth
    of the CPU of a small model's request. Counts are the same as counting each batch alone, in the minute the
    values were served in. A tap holds at most DRIFT_TAP_MAX_VALUES: references past those it has room for are
    counted at once, as is every batch of a tap the recorder has let go of (`detach`: its version no longer
    served). Used from any thread.
    """

    def __init__(
        self,
        references: tuple[DriftReference, ...],
        sink: Callable[[DriftCounts, float], None],
        pending: Callable[[], None],
        capacity: int = DRIFT_BUFFER_ELEMENTS,
        max_values: int = DRIFT_TAP_MAX_VALUES,
    ) -> None:
        self.references = references
        self._sink = sink  # counts made here, with a time in their minute: the recorder's `add_drift`
        self._pending = pending  # told when the tap starts to hold values: the writer has counts due
        self._capacity = max(capacity, DRIFT_MAX_ELEMENTS)  # a request's values, unstrided, fit
        # the references that get a buffer: the first ones, as many as DRIFT_TAP_MAX_VALUES holds (a package's
        # references are its claim: hundreds of thousands fit in a manifest, and each buffer is real memory)
        self._buffered = min(len(references), max(1, max_values // self._capacity))
        self._lock = threading.Lock()
        self._buffers: list[Any] = [None] * len(references)  # per reference: a numpy array of `capacity`
        self._filled = [0] * len(references)
        self._minute: int | None = None  # the minute of the values held (None: none held)
        self._detached = False

    def add(self, values: Sequence[tuple[int, Any]], counted: DriftCounts, ts: float | None = None) -> None:
        """A batch's drift: `values`, (reference index, the batch's values of its tensor), to count; `counted`,
        counts made already (a batch whose requests' values are strided each alone)."""
        now = time.time() if ts is None else ts
        minute = minute_of(now)
        made: list[tuple[int, DriftCounts]] = []
        counted = list(counted)
        with self._lock:
            if self._minute is not None and self._minute != minute:
                made.extend(self._take_held())
            idle = self._minute is None
            for index, array in values:
                reference = self.references[index]
                flat = array.reshape(-1)
                if (
                    self._detached
                    or index >= self._buffered
                    or flat.dtype.kind not in "biuf"
                    or flat.size > DRIFT_MAX_ELEMENTS  # strided
                ):
                    counted.append((reference.tensor, bin_counts(reference, flat)))
                    continue
                buffer = self._buffers[index]
                filled = self._filled[index]
                if buffer is None or buffer.dtype != flat.dtype or filled + flat.size > self._capacity:
                    if filled:  # held values are of this minute (another minute's were counted above)
                        made.append((minute, [(reference.tensor, count_flat(reference, buffer[:filled]))]))
                    if buffer is None or buffer.dtype != flat.dtype:
                        buffer = self._buffers[index] = np.empty(self._capacity, flat.dtype)
                    filled = 0
                buffer[filled : filled + flat.size] = flat
                self._filled[index] = filled + flat.size
                self._minute = minute
            started = idle and self._minute is not None
        for held_minute, counts in made:
            self._sink(counts, held_minute * 60.0)
        if counted:
            self._sink(counted, now)
        if started:
            self._pending()

    def take(self) -> list[tuple[int, DriftCounts]]:
        """The counts of the values held, with their minute; the tap holds none after."""
        with self._lock:
            return self._take_held()

    def detach(self) -> list[tuple[int, DriftCounts]]:
        """From now on count each batch at once; the counts of the values held, as `take`."""
        with self._lock:
            self._detached = True
            taken = self._take_held()
            self._buffers = [None] * len(self.references)
            return taken

    def _take_held(self) -> list[tuple[int, DriftCounts]]:
        """Called under `_lock`."""
        if self._minute is None:
            return []
        taken = [(self._minute, self._count_held())]
        self._minute = None
        return taken

    def _count_held(self) -> DriftCounts:
        """Count the values held and empty the buffers. Called under `_lock`."""
        counts = []
        for index, filled in enumerate(self._filled):
            if filled:
                reference = self.references[index]
                counts.append((reference.tensor, count_flat(reference, self._buffers[index][:filled])))
                self._filled[index] = 0
        return counts


class TelemetryRecorder:
    """Owns the buffer's writes on one thread; `record` resolves once its outcome is committed."""

    def __init__(self, config: TelemetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.buffer = TelemetryBuffer(config.path, config.budget_bytes)
        self._queue: queue.SimpleQueue[_Waiter | _Command | None] = queue.SimpleQueue()
        self._rng = rng or random.Random()
        self._lost = 0
        # Drift, per model version: its references, and its counts of the last `drift_window_minutes` minutes per
        # tensor. A version that stops serving is forgotten once its window is empty (see `_forget_stale`): a node
        # that runs for months serves many. Both under `_window_lock` (the event loop sets references, the writer
        # thread adds counts, a scrape reads).
        self._references: dict[tuple[str, str], tuple[DriftReference, ...]] = {}
        self._current: dict[str, str] = {}  # model -> the version whose references were set last
        self._swept = 0  # the minute of the last `_forget_stale`
        self._window: dict[tuple[str, str, str], deque[tuple[int, list[int]]]] = {}
        self._window_lock = threading.Lock()
        # Drift counts (under `_window_lock`): those added since the last fold, in neither the window nor the
        # buffer (`add_drift`), and those in the window but not yet in the buffer (`_fold_drift`); when the writer
        # last wrote some
        self._drift_new: DriftSums = {}
        self._drift_unwritten: DriftSums = {}
        self._drift_written = time.monotonic()
        # the taps of the versions with references (`drift_tap`), and whether one may hold values (under
        # `_window_lock`)
        self._taps: dict[tuple[str, str], DriftTap] = {}
        self._taps_pending = False
        self._writer_waits = False  # the writer found no drift counts and waits for work with no time limit
        self._turns: dict[asyncio.AbstractEventLoop, _Waiter] = {}  # outcomes recorded in the loop's current turn
        # The buffer is used by one thread at a time: the writer thread, or an event loop committing its turn's
        # outcomes (`_commit_here`), which never waits for it
        self._lock = threading.Lock()
        self._maintenance_asked = False  # a commit on a loop has asked the writer to maintain the buffer
        self._inline_from = 0.0  # no commit on a loop before this (monotonic): one was slow
        self.inline_slow_s = INLINE_SLOW_S
        self._thread = threading.Thread(target=self._run, name="strata-telemetry", daemon=True)
        self._thread.start()

    # --- the inference side -----------------------------------------------------------------------------

    async def record(self, outcome: Outcome) -> None:
        """Buffer one outcome; returns once it is committed (or its loss is counted). The outcomes recorded in
        one turn of the event loop go to the writer together, at the end of the turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        turn = self._turn(loop)
        self._add(turn, outcome)
        turn.futures.append((future, None))
        await future

    def record_answers(
        self, model: str, version: str, variant: str, ts: float, answers: Sequence[RecordedAnswer[_T]]
    ) -> None:
        """Buffer the outcomes of a batch's answered requests (of one model version, done at `ts`), from the event
        loop; each future gets its answer (the value beside it) once its outcome is committed (or its loss counted),
        unless it was cancelled meanwhile. One call and one wake-up of each request, not two; the requests kept as
        no event are counted straight into their minute's row, and an Outcome is made only for those kept."""
        turn = self._turn(asyncio.get_running_loop())
        config, draw, key = self.config, self._rng.random, (model, version, variant, minute_of(ts))
        row = None
        for future, answer, latency_us, queue_us, rows, summarize in answers:
            priority = event_priority(True, latency_us, config.slow_us, config.sample_rate, draw())
            if priority is None:
                if row is None:
                    row = turn.rows.get(key)
                    if row is None:
                        row = turn.rows[key] = MinuteRow(*key)
                row.count(latency_us, queue_us, rows)
            else:
                turn.outcomes.append(
                    Outcome(ts, model, version, variant, latency_us, queue_us, rows, True, "ok", summarize=summarize)
                )
                turn.priorities.append(priority)
            turn.futures.append((future, answer))

    def record_nowait(self, outcome: Outcome) -> None:
        """Buffer one outcome without waiting for its commit (a shed request's: its 503 goes out at once)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on an event loop: straight to the writer
            waiter = _Waiter(None)
            self._add(waiter, outcome)
            self._queue.put(waiter)
            return
        self._add(self._turn(loop), outcome)

    def _add(self, waiter: _Waiter, outcome: Outcome) -> None:
        """Keep an outcome as an event (errors, slow ones, a sample), or count it in its minute's row: most are
        only counted, and an outcome counted costs the writer nothing of its own."""
        config = self.config
        draw = self._rng.random()
        priority = event_priority(outcome.ok, outcome.latency_us, config.slow_us, config.sample_rate, draw)
        if priority is None:
            count_outcome(waiter.rows, outcome)
        else:
            waiter.outcomes.append(outcome)
            waiter.priorities.append(priority)

    def _turn(self, loop: asyncio.AbstractEventLoop) -> _Waiter:
        """The outcomes of this turn of `loop`, handed over once the callbacks ready now have run."""
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = _Waiter(loop)
            loop.call_soon(self._hand_over, loop)
        return turn

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        turn = self._turns.pop(loop, None)
        # a turn of shed requests only (nobody waits for their commit) is the writer's: an overloaded loop has
        # better things to do
        if turn is not None and not (turn.futures and self._commit_here(turn)):
            self._queue.put(turn)

    def _commit_here(self, turn: _Waiter) -> bool:
        """Commit a turn's outcomes on this thread (the event loop's) if that means no wait: the writer thread is
        not using the buffer, no other connection (serving process) is writing, and no commit made here was slow
        in the last INLINE_PAUSE_S. False: nothing was done, the writer thread commits them. Committing here
        saves the hand-over to the writer thread and back, which cost more than the commit itself; the log's
        checkpoints and the budget stay on the writer thread, so a commit here is an append to the log."""
        if time.monotonic() < self._inline_from or not self._lock.acquire(blocking=False):
            return False
        try:
            started = time.monotonic()
            if not self._commit([turn], wait=False):
                return False
            took = time.monotonic() - started
            if self.buffer.maintenance_due and not self._maintenance_asked:
                self._maintenance_asked = True
                self._queue.put(_Waiter(None))  # the writer maintains the buffer when it wakes
        finally:
            self._lock.release()
        if took > self.inline_slow_s:
            self._inline_from = time.monotonic() + INLINE_PAUSE_S
            log.warning(
                "a telemetry commit on the event loop took %.1f ms (a slow disk?): the writer thread commits for"
                " the next %.0f s",
                took * 1000,
                INLINE_PAUSE_S,
            )
        return True

    def add_drift(
        self, model: str, version: str, counts: Sequence[tuple[str, Sequence[int]]], ts: float | None = None
    ) -> None:
        """A batch's drift counts, (tensor, counts in its reference's bins), from any thread: summed by minute
        here, then written to the buffer and counted in the drift window with the writer's first commit
        DRIFT_WRITE_S after its last drift write (or before it seals a batch for upload, or as it closes); `drift_psi`
        counts them from now on. Drift is kept per minute, so it is written about once a second instead of with
        every request's outcome: a kill loses at most the last DRIFT_WRITE_S of drift counts (never an outcome:
        those are written before their answers go out)."""
        minute = minute_of(time.time() if ts is None else ts)
        with self._window_lock:
            for tensor, added in counts:
                _sum_into(self._drift_new, (model, version, minute, tensor), added)
            self._wake_writer()

    def _tap_pending(self) -> None:
        """A tap started to hold values: the writer has drift counts due within DRIFT_WRITE_S."""
        with self._window_lock:
            self._taps_pending = True
            self._wake_writer()

    def _wake_writer(self) -> None:
        """Wake the writer if it waits for work with no time limit (it found no drift counts when it last looked):
        it now has some due within DRIFT_WRITE_S. Decided by what the writer did, not by what the counts look like:
        a fold elsewhere may have moved them since. Called under `_window_lock`."""
        if self._writer_waits:
            self._writer_waits = False
            self._queue.put(_Waiter(None))

    def _fold_drift(self, every_tap: bool = False) -> None:
        """Count the drift added since the last fold, and the values the taps hold (those that said so, or all of
        them: `every_tap`), in the windows, and keep it for the buffer. Called under `_window_lock`."""
        if self._taps_pending or every_tap:
            self._taps_pending = False
            for (model, version), tap in self._taps.items():
                self._keep_taken(model, version, tap.take())
        if not self._drift_new:
            return
        new, self._drift_new = self._drift_new, {}
        for key, counts in new.items():
            model, version, minute, tensor = key
            self._count_in_window(model, version, minute, tensor, counts)
            _sum_into(self._drift_unwritten, key, counts)
        newest = max(minute for _, _, minute, _ in new)
        if newest > self._swept:  # once a minute
            self._swept = newest
            self._forget_stale(newest)

    def set_references(self, model: str, version: str, references: tuple[DriftReference, ...]) -> None:
        """The drift references of a model version now served (from its package)."""
        with self._window_lock:
            self._set_references(model, version, references)

    def drift_tap(self, model: str, version: str, references: tuple[DriftReference, ...]) -> DriftTap:
        """The drift references of a model version now served (`set_references`), and the tap its batches count
        their drift in."""
        tap = DriftTap(references, functools.partial(self.add_drift, model, version), self._tap_pending)
        with self._window_lock:
            self._set_references(model, version, references)
            self._taps[(model, version)] = tap
        return tap

    def _set_references(self, model: str, version: str, references: tuple[DriftReference, ...]) -> None:
        """Called under `_window_lock`."""
        self._fold_drift()
        self._references[(model, version)] = references
        self._current[model] = version
        self._let_go(self._taps.pop((model, version), None), model, version)  # the tap of an earlier activation
        self._forget_stale(None)

    def _let_go(self, tap: DriftTap | None, model: str, version: str) -> None:
        """Detach a tap (its version no longer has references here, or has a new tap); what it held is folded with
        the next counts. Called under `_window_lock`."""
        if tap is not None and self._keep_taken(model, version, tap.detach()):
            self._wake_writer()  # a batch added them after the last fold

    def _keep_taken(self, model: str, version: str, taken: list[tuple[int, DriftCounts]]) -> bool:
        """Add what a tap held (`take`, `detach`) to the drift counts not yet folded; False: it held nothing.
        Called under `_window_lock`."""
        for minute, counts in taken:
            for tensor, added in counts:
                _sum_into(self._drift_new, (model, version, minute, tensor), added)
        return bool(taken)

    def references(self, model: str, version: str) -> tuple[DriftReference, ...]:
        with self._window_lock:
            return self._references.get((model, version), ())

    def drift_psi(self) -> dict[tuple[str, str, str], float]:
        """PSI of each served tensor's last `drift_window_minutes` minutes against its reference."""
        out = {}
        with self._window_lock:
            self._fold_drift(every_tap=True)  # even values whose tap has not said so yet
            for (model, version, tensor), window in self._window.items():
                references = self._references.get((model, version), ())
                reference = next((r for r in references if r.tensor == tensor), None)
                if reference is None or not window:
                    continue
                totals = [sum(column) for column in zip(*(counts for _, counts in window), strict=True)]
                out[(model, version, tensor)] = psi(reference.counts, totals)
        return out

    # --- the writer thread ------------------------------------------------------------------------------

    def call(self, function: Callable[[], Any], timeout: float = 60.0) -> Any:
        """Run `function` on the writer thread (the only one that writes the buffer) and return its result.

        Raises:
            StrataError: the writer did not answer in time.
            Exception: whatever `function` raised.
        """
        command = _Command(function)
        self._queue.put(command)
        if not command.done.wait(timeout):
            raise StrataError("telemetry writer did not answer")
        if command.error is not None:
            raise command.error
        return command.result

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._drift_wait())
            except queue.Empty:  # drift counts are due and no outcome came to take them along
                with self._lock:
                    self._write_drift()
                continue
            items: list[_Waiter | _Command | None] = [first]
            with contextlib.suppress(queue.Empty):
                while first is not None and len(items) < 4096:
                    items.append(self._queue.get_nowait())
            with self._lock:
                stop = self._work(items)
            for item in items:  # their callers go on once the buffer is free: a commit on a loop finds it so
                if isinstance(item, _Command):
                    item.done.set()
            if stop:
                return

    def _work(self, items: list[_Waiter | _Command | None]) -> bool:
        """Commit the outcomes among `items`, run their commands, and keep the buffer in shape; True: stop.
        Called under `_lock`."""
        stop = None in items
        waiters = [item for item in items if isinstance(item, _Waiter)]
        if waiters:
            self._commit(waiters)
        if stop or any(isinstance(item, _Command) for item in items):
            self._write_drift()  # a batch sealed now holds every count made before it
        for item in items:
            if isinstance(item, _Command):
                try:
                    item.result = item.run()
                except BaseException as exc:  # handed back to the caller of `call`
                    item.error = exc
        if self.buffer.maintenance_due:
            try:
                self.buffer.maintain()
            except sqlite3.Error as exc:  # a full disk: what is in the buffer stays, the next writes count losses
                log.error("telemetry buffer maintenance failed: %s", exc)
        self._maintenance_asked = False  # due again only after MAINTAIN_EVERY more writes: a loop may ask then
        return stop

    def _drift_wait(self) -> float | None:
        """How long the writer may wait for work before the drift counts it holds are due (None: it holds none)."""
        with self._window_lock:  # not midway through a fold, which empties one before it fills the other
            self._writer_waits = not self._drift_new and not self._drift_unwritten and not self._taps_pending
            if self._writer_waits:
                return None
        return max(0.0, self._drift_written + DRIFT_WRITE_S - time.monotonic())

    def _take_drift(self, due_only: bool) -> DriftSums:
        if due_only and time.monotonic() < self._drift_written + DRIFT_WRITE_S:
            return {}
        with self._window_lock:
            self._fold_drift(every_tap=not due_only)  # a seal or the close: every value a tap holds
            drift, self._drift_unwritten = self._drift_unwritten, {}
        if drift:
            self._drift_written = time.monotonic()
        return drift

    def _write_drift(self) -> None:
        drift = self._take_drift(due_only=False)
        if drift:
            try:
                self.buffer.write([], [], drift)
            except sqlite3.Error as exc:
                log.error("telemetry buffer write failed (%s); %d drift counts not recorded", exc, len(drift))

    def _commit(self, waiters: list[_Waiter], wait: bool = True) -> bool:
        """Commit the waiters' outcomes (and the drift counts due, on the writer thread: `wait`), then wake
        those who wait for them. False: not `wait`, and another connection was writing; nothing was done.
        Called under `_lock`."""
        outcomes = [outcome for waiter in waiters for outcome in waiter.outcomes]
        priorities = [priority for waiter in waiters for priority in waiter.priorities]
        rows = [waiter.rows for waiter in waiters if waiter.rows]
        drift = self._take_drift(due_only=True) if wait else {}
        if not outcomes and not rows and not drift:  # a wake-up for drift not yet due, or for maintenance
            return True
        try:
            self.buffer.write(outcomes, priorities, drift, rows=rows, lost=self._lost, wait=wait)
            self._lost = 0
        except Busy:
            return False
        except Exception as exc:  # disk full, damaged file, a bug: inference goes on, answers too, the loss is counted
            requests = sum(waiter.requests for waiter in waiters)
            self._lost += requests
            log.error(
                "telemetry buffer write failed (%s); %d outcomes and %d drift counts not recorded",
                exc,
                requests,
                len(drift),
                exc_info=not isinstance(exc, sqlite3.Error),
            )
        # one wake-up per event loop for the whole group, not one per request; none for the loop committing
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for waiter in waiters:
            if waiter.loop is not None and waiter.futures:
                by_loop.setdefault(waiter.loop, []).extend(waiter.futures)
        here = _running_loop()
        for loop, futures in by_loop.items():
            if loop is here:
                _resolve(futures)
            elif not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                    loop.call_soon_threadsafe(_resolve, futures)
        return True

    def _count_in_window(self, model: str, version: str, minute: int, tensor: str, counts: Sequence[int]) -> None:
        """Add counts to the tensor's drift window, dropping its minutes past `drift_window_minutes`. Called under
        `_window_lock`."""
        window = self._window.setdefault((model, version, tensor), deque())
        if window and window[-1][0] == minute and len(window[-1][1]) == len(counts):
            window[-1] = (minute, [a + b for a, b in zip(window[-1][1], counts, strict=True)])
        else:
            window.append((minute, list(counts)))
        while window and window[0][0] <= minute - self.config.drift_window_minutes:
            window.popleft()

    def _forget_stale(self, minute: int | None) -> None:
        """Drop the windows with nothing newer than `drift_window_minutes` before `minute` (a version no longer
        served), then the references of versions that are neither a model's current one nor have a window.
        Called under `_window_lock`."""
        if minute is not None:
            horizon = minute - self.config.drift_window_minutes
            for stale in [key for key, window in self._window.items() if not window or window[-1][0] <= horizon]:
                del self._window[stale]
        keep = {(model, version) for model, version, _ in self._window} | set(self._current.items())
        for unused in [key for key in self._references if key not in keep]:
            del self._references[unused]
            self._let_go(self._taps.pop(unused, None), *unused)

    def stats(self) -> BufferStats:
        stats: BufferStats = self.call(self.buffer.stats)
        return stats

    def close(self) -> None:
        # outcomes of a loop turn whose hand-over has not run yet (a shed request's, as the server stopped) go
        # to the writer before it is told to stop, not after
        for loop in list(self._turns):
            self._hand_over(loop)
        self._queue.put(None)
        self._thread.join(timeout=10)
        with self._lock:  # not under a commit a loop is making
            self.buffer.close()


def count_outcome(rows: dict[MinuteKey, MinuteRow], outcome: Outcome) -> None:
    """Count an outcome in its minute's row of `rows`."""
    key = (outcome.model, outcome.version, outcome.variant, minute_of(outcome.ts))
    row = rows.get(key)
    if row is None:
        row = rows[key] = MinuteRow(*key)
    row.count(outcome.latency_us, outcome.queue_us, outcome.batch)
    if not outcome.ok:
        row.errors += 1
        if is_client_fault(outcome.status):
            row.client_errors += 1
        elif is_shed(outcome.status):
            row.shed += 1


def first_sequence(now: float) -> int:
    """The number of a new buffer's first batch: the time (`now`) in milliseconds.

    The control plane stores each (node, seq) once. A node's buffer is made anew on a machine that replaces it
    (enrolled again under the same node id) or after a damaged one was moved aside; had it counted from 1 again, its
    batches would be taken for resends of the old buffer's and acknowledged without being stored. A buffer seals far
    fewer than 1000 batches a second, so its numbers stay below those of any buffer made after it.
    """
    return max(1, int(now * 1000))


def _sum_into(sums: DriftSums, key: tuple[str, str, int, str], counts: Sequence[int]) -> None:
    """Add counts to a key's in `sums`; counts of another length than the key's first (its reference changed
    within the minute) are left out."""
    total = sums.get(key)
    if total is None:
        sums[key] = list(counts)
    elif len(total) == len(counts):
        sums[key] = [a + b for a, b in zip(total, counts, strict=True)]


def _summary_of(outcome: Outcome) -> str:
    if outcome.summarize is None:
        return outcome.summary
    try:
        return outcome.summarize()
    except Exception:  # a summary is a courtesy: never lose the event over it
        log.exception("cannot summarise a request of model %s", outcome.model)
        return outcome.summary


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _resolve(futures: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, value in futures:
        if not future.done():
            future.set_result(value)


# --- the uploader ---------------------------------------------------------------------------------------


class TelemetryUploader:
    """Seals and sends batches in order, one at a time, until the buffer is empty; then waits."""

    def __init__(
        self,
        recorder: TelemetryRecorder,
        send: Callable[[int, bytes], bool],
        node_id: Callable[[], str | None],
        *,
        clock: Callable[[], float] = time.time,
        backoff_max_s: float = 60.0,
    ) -> None:
        """`send(seq, payload)` returns True when the server stored (or already had) the batch, False when
        it refused it for good (malformed: the batch is dropped and counted); it raises on transient errors."""
        self.recorder = recorder
        self.send = send
        self.node_id = node_id
        self.clock = clock
        self.backoff_max_s = backoff_max_s
        self.stop = threading.Event()
        self.kick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="strata-telemetry-upload", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def drain(self) -> int:
        """Send every buffered batch now; return how many were acknowledged. Raises on transient errors."""
        node = self.node_id()
        if node is None:
            return 0
        config = self.recorder.config
        sent = 0
        buffer = self.recorder.buffer
        while True:
            sealed = self.recorder.call(
                functools.partial(buffer.seal, node, self.clock(), config.batch_max_events, config.batch_max_minutes)
            )
            if sealed is None:
                return sent
            pending = self.recorder.call(buffer.read_outbox)  # on the writer's thread: see TelemetryBuffer
            if pending is None:
                continue
            seq, payload = pending
            stored = self.send(seq, payload)
            if not stored:
                log.error("control plane refused telemetry batch %d for good; dropping it", seq)
                self.recorder.call(functools.partial(buffer.count_dropped, "rejected", 1))
            self.recorder.call(functools.partial(buffer.ack, seq, self.clock()))
            sent += 1
            if not stored:
                return sent  # the next batch (which reports this drop) waits for the next round

    def _run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            try:
                self.drain()
                failures = 0
                delay = self.recorder.config.upload_interval_s
            except (StrataError, OSError, sqlite3.Error) as exc:
                failures += 1
                delay = min(self.backoff_max_s, math.ldexp(1.0, min(failures, 6))) * random.uniform(0.5, 1.0)
                log.info("telemetry upload failed (%s); retrying in %.1fs", exc, delay)
            self.kick.wait(delay)
            self.kick.clear()


class TelemetryGauges:
    """The buffer's state and the node's drift, as gauges in the agent's /metrics (refreshed per scrape)."""

    def __init__(self, registry: MetricsRegistry) -> None:
        self.rows = registry.gauge("strata_telemetry_buffer_rows", "Rows waiting in the telemetry buffer", ("table",))
        self.pending = registry.gauge(
            "strata_telemetry_bytes_pending", "Compressed bytes sealed and waiting for the control plane's ack"
        )
        self.disk = registry.gauge("strata_telemetry_buffer_bytes", "Bytes the telemetry buffer uses on disk")
        self.dropped = registry.gauge(
            "strata_telemetry_dropped", "Telemetry dropped by the disk budget or lost to write errors", ("kind",)
        )
        self.uploaded = registry.gauge("strata_telemetry_uploaded_batches", "Batches the control plane acknowledged")
        self.last_upload = registry.gauge(
            "strata_telemetry_last_upload_timestamp_seconds", "When the last batch was acknowledged (0: never)"
        )
        self.psi = registry.gauge(
            "strata_drift_psi",
            "Population stability index of a tensor's recent values against its build-time reference",
            ("model", "version", "tensor"),
        )

    def update(self, stats: BufferStats, psi_values: Mapping[tuple[str, str, str], float]) -> None:
        self.rows.replace({("minutes",): stats.minutes, ("events",): stats.events, ("outbox",): stats.outbox})
        self.pending.set(value=stats.bytes_pending)
        self.disk.set(value=stats.disk_bytes)
        self.dropped.replace({(kind,): count for kind, count in stats.dropped.items()})
        self.uploaded.set(value=stats.uploaded_batches)
        self.last_upload.set(value=stats.last_upload or 0)
        self.psi.replace({tuple(key): value for key, value in psi_values.items()})
