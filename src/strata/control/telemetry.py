"""Telemetry on the control plane: store each node's batches exactly once, and answer queries over them.

A batch is stored in one transaction together with its (node, seq) row; a resend finds the row and is
acknowledged without being stored again. Minute aggregates of the same (node, model, version, variant,
minute) that arrive in several batches are added up, which is exact because each batch counts once.

Errors: `errors` counts every failed request, `client_errors` those of them refused as the caller's fault
(malformed, or not fitting the model's signature) and `shed` those shed by admission control (the node was busy; the
model never saw them). The answers' `error_rate` is what the model and the node failed (`errors - client_errors -
shed`) over the requests they took on (`requests - client_errors - shed`): the rollout gates' `error_rate`, which
the nodes' serving counters give (they count neither malformed nor shed requests). `client_error_rate` and
`shed_rate` are the caller's faults and the shed requests over all requests, beside it: clients that send garbage
and load shedding do not make a healthy model look broken, and still show.

Retention (`TelemetryService.sweep`): minutes, events and drift counts older than the retention are deleted in
chunks of `SWEEP_CHUNK` rows, one short transaction each (no long write lock on SQLite, no large PostgreSQL
transaction); the counts of the minutes deleted live on in one row per series, for /metrics. The (node, seq)
records that make ingest exactly once are kept by a stricter rule (`sweep`'s docstring).
Per-node counts of dropped data (`telemetry_dropped`) are totals, not time series, and are kept.

A batch's dates are the node's claims (its clock may be wrong; the decoder has none): ingest sorts its rows by the
server's clock (`screen`). Rows dated more than `FUTURE_SKEW_S` ahead are left out and counted (the sweep would never
reach them, and every query from `since` on would count them); rows the sweep would delete at once are not stored
(a minute's counts go straight to its series' `EXPIRED_MINUTE` row). The batch is still stored and acknowledged:
refused, the node would drop its good rows with the bad ones.

A batch's names are claims too: minute rows of a variant, and drift rows of a model version, that the registry does
not know are left out and counted (`UNKNOWN_KINDS`): each (model, version) a node named would otherwise be a row kept
for ever (`EXPIRED_MINUTE`) and a /metrics series. Sampled events and drift rows are held to a per-node budget
(`EVENT_BURST`, `DRIFT_BURST`); a node's minutes, one row per variant it runs a minute, are not.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import Select, and_, bindparam, func, insert, or_, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from strata.control.db import (
    SWEEP_CHUNK,
    SWEEP_PAUSE_S,
    Database,
    Model,
    ModelVersion,
    Node,
    TelemetryBatch,
    TelemetryDrift,
    TelemetryDropped,
    TelemetryEvent,
    TelemetryMinute,
    Variant,
    in_chunks,
)
from strata.control.gates import DriftFigure
from strata.control.lease import serialize
from strata.control.quota import RecordBudget
from strata.core.errors import Conflict, Forbidden, NotFound
from strata.core.telemetry import (
    BUCKETS,
    MAX_BATCH_BYTES,
    MAX_COUNT,
    DriftReference,
    DriftRow,
    EventRow,
    MinuteRow,
    TelemetryError,
    add_counts,
    chi_square_statistic,
    decode_batch,
    drift_references,
    percentile_ms,
    psi,
)
from strata.core.telemetry import TelemetryBatch as Batch
from strata.core.wire import ProtocolError
from strata.core.words import duration, parse_retention, plural

log = logging.getLogger(__name__)

_NewerBatch = aliased(TelemetryBatch)
# The minute of the row per (node, model, version, variant) that holds the counts of its minutes deleted by the
# retention sweep; no batch holds a negative minute (`decode_batch`).
EXPIRED_MINUTE = -1

MAX_UPLOAD_BYTES = MAX_BATCH_BYTES  # compressed: a body larger than its largest decompressed batch is not one
# The most minute (or drift) rows one `GET /v1/telemetry` reads: 100,000 rows answered in 25 MB and 7 s, and a
# read token asking for 90 days of a big fleet's model would otherwise have the server hold all of them.
MAX_QUERY_ROWS = 100_000
PSI_DRIFT = 0.2  # above this a tensor is reported as drifting (0.1-0.25 moderate, > 0.25 significant)
MIN_RETENTION_S = 3600.0
RETENTION = "telemetry-retention"  # the sweep's `serialize` name
# How far past the server's clock a node may date its telemetry (a clock running a little ahead; Kerberos allows as
# much): a minute that starts later, or an event after it, is left out (`screen`).
FUTURE_SKEW_S = 300.0


@dataclass(frozen=True)
class IngestResult:
    seq: int
    stored: bool


@dataclass(frozen=True)
class MinuteView:
    """One node's traffic for one model version in one minute (variants added up)."""

    node: str
    node_id: str
    model: str
    version: str
    minute: int
    requests: int
    errors: int  # every failed request
    client_errors: int  # of those, the ones refused as the caller's fault
    shed: int  # of those, the ones shed by admission control
    n: int  # the requests the percentiles rest on; each is None below its minimum (`min_samples`)
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class TensorDrift:
    tensor: str
    psi: float
    chi_square: float
    p_value: float | None
    samples: int
    drifting: bool


@dataclass(frozen=True)
class NodeSummary:
    """One node's traffic for one model version over the queried window."""

    node: str
    node_id: str
    model: str
    version: str
    requests: int
    errors: int  # every failed request
    client_errors: int  # of those, the ones refused as the caller's fault
    shed: int  # of those, the ones shed by admission control
    error_rate: float  # what the model and the node failed, of the requests they took on (`error_rates`)
    client_error_rate: float  # client_errors / requests
    shed_rate: float  # shed / requests
    n: int  # as MinuteView.n
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    drift: list[TensorDrift]
    dropped: dict[str, int]

    @property
    def max_psi(self) -> float | None:
        return max((d.psi for d in self.drift), default=None)


@dataclass(frozen=True)
class ErrorRates:
    """A node's error rates over a window, each 0 without the requests it divides by.

    `error_rate` is what the model and the node failed over the requests they took on (neither malformed nor shed):
    the rollout gates' `error_rate` (`gates.error_rate`) over the same requests. `client_error_rate` and
    `shed_rate` are shares of all requests.
    """

    error_rate: float
    client_error_rate: float
    shed_rate: float


def error_rates(requests: int, errors: int, client_errors: int, shed: int) -> ErrorRates:
    """The error rates of `requests`, of which `errors` failed: `client_errors` of them as the caller's fault,
    `shed` shed by admission control."""
    taken = requests - client_errors - shed
    return ErrorRates(
        error_rate=round((errors - client_errors - shed) / taken, 6) if taken else 0.0,
        client_error_rate=round(client_errors / requests, 6) if requests else 0.0,
        shed_rate=round(shed / requests, 6) if requests else 0.0,
    )


@dataclass
class _Traffic:
    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    shed: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def add(self, row: TelemetryMinute) -> None:
        self.requests += row.requests
        self.errors += row.errors
        self.client_errors += row.client_errors
        self.shed += row.shed
        self.latency = [a + b for a, b in zip(self.latency, row.latency, strict=True)]


EXPIRED_NOUNS = {"minutes": "minute row", "events": "event", "drift": "drift row", "batches": "batch record"}
EXPIRED_KINDS = tuple(EXPIRED_NOUNS)
# The rows a batch carries dates on, and the `telemetry_dropped` kind that counts those of a node left out as dated
# past FUTURE_SKEW_S: the control plane's own count, under a kind no batch may name (`DROPPED_KINDS`).
FUTURE_KINDS = {"minutes": "future_minutes", "events": "future_events", "drift": "future_drift"}
# Sampled events a node may have stored: a burst (a node back from an outage sends its backlog, 20,000 a batch) and
# then a steady rate. A node's events are its claim, and each is a row: uploading full batches back to back, one
# compromised node added about 50,000 rows a second. Its minutes (the counts) are not budgeted; events past the
# budget are left out, those of errors last, and counted in its dropped telemetry as OVER_BUDGET_KIND.
EVENT_BURST = 200_000
EVENTS_PER_S = 100.0
OVER_BUDGET_KIND = "events_over_budget"
# Drift rows a node may have stored: one per (model, version, minute, tensor), a handful of tensors per model. One
# node's certificate stored 50,000 of them per 672-byte upload (DRIFT_ROWS_TAKEN), for the whole retention. The burst
# is what an agent's full telemetry buffer holds (64 MiB, about 100 bytes a drift row: some 650,000), so a backlog
# the node kept through an outage is never cut: 10 models of 8 tensors (80 rows a minute) for 5 days is 576,000. The
# rate is that node's 80 a minute and half as much again (or 15 models of 8 tensors). Past it the newest minutes
# are kept (what the drift gates read), and the rest counted in the node's dropped telemetry as DRIFT_OVER_BUDGET_KIND.
DRIFT_BURST = 600_000
DRIFT_ROWS_PER_S = 2.0
DRIFT_OVER_BUDGET_KIND = "drift_over_budget"
# The rows a batch carries a model's name on, and the `telemetry_dropped` kind that counts those of a node left out
# because the registry does not know their variant (minutes) or model version (drift): names no package has. A
# model version gone from the registry is no longer any node's to run: its late rows are counted here, not stored.
UNKNOWN_KINDS = {"minutes": "unknown_minutes", "drift": "unknown_drift"}
# Keys named in one lookup of stored rows: ingest reads the rows a batch adds to a statement per this many, not one
# per row (a 50,000-row batch held SQLite's write lock for 24 s). A statement is an OR of primary-key lookups (SQLite
# answers a row-value IN list by scanning the node's rows, once per statement); 250 terms stay well within SQLite's
# expression depth (1,000) and bound parameters (32,766).
LOOKUP_CHUNK = 250


@dataclass
class IngestCounters:
    """In-process counters for /metrics."""

    batches: int = 0
    duplicates: int = 0
    bytes: int = 0
    minutes: int = 0
    events: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # rows the retention sweep deleted, or ingest did not store for it, by kind (minutes, events, drift, batches)
    expired: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXPIRED_KINDS, 0))
    # rows left out as dated past FUTURE_SKEW_S, by kind (minutes, events, drift)
    future: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FUTURE_KINDS, 0))
    # rows left out as naming what the registry does not know, by kind (minutes, drift)
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(UNKNOWN_KINDS, 0))


def retention_seconds(text: str) -> float:
    """`--telemetry-retention` ('90d', '36h', ...) in seconds: at least an hour, and finite.

    Raises:
        ConfigError: not a duration, not finite, or under an hour.
    """
    return parse_retention(text, "--telemetry-retention", MIN_RETENTION_S)


def retention_cutoff(now: float, retention_s: float) -> tuple[float, int]:
    """What is older than `retention_s` at `now`: events before the first value, minutes and drift counts before the
    second (a minute goes once it ended before the cutoff: the API reaches back to `since // 60`)."""
    cutoff = now - retention_s
    return cutoff, math.floor(cutoff / 60)


@dataclass(frozen=True)
class ScreenedBatch:
    """A batch's rows as the server's clock sorts them (`screen`)."""

    minutes: list[MinuteRow]  # stored as they are
    expired_minutes: list[MinuteRow]  # older than the retention: their counts go to their series' EXPIRED_MINUTE row
    # dated past the skew, of a known variant: their counts go to that row too (the requests were served; only their
    # time is unknown), and they are counted in `future`; not exported (a collector would take the false date)
    future_minutes: list[MinuteRow]
    events: list[EventRow]
    drift: list[DriftRow]
    future: dict[str, int]  # rows left out as dated past the skew, by kind (FUTURE_KINDS)
    expired: dict[str, int]  # rows older than the retention, by kind: events and drift left out, minutes folded
    unknown: dict[str, int]  # rows left out as naming what the registry does not know, by kind (UNKNOWN_KINDS)
    unknown_versions: list[tuple[str, str]]  # the (model, version)s of those rows, sorted
    ahead_s: float  # how far past the server's clock the furthest row left out was dated (0: none)


def screen(
    batch: Batch,
    now: float,
    retention_s: float,
    known: frozenset[tuple[str, str, str]],
    skew_s: float = FUTURE_SKEW_S,
) -> ScreenedBatch:
    """Sort a batch's rows by the server's clock `now` and the registry's `known` (model, version, variant)s (pure):
    a node's dates and names are claims, and its clock may be wrong.

    A row dated more than `skew_s` past `now` (a minute or drift count whose minute starts later, an event after it)
    is left out: the retention sweep (`now - retention_s`) would never reach it, and every query from a `since` on
    would count it; a minute's counts (of a known variant) still go to its series' `EXPIRED_MINUTE` row, as a row too
    old does, for the requests were served, only their time is unknown. A minute row of a variant not in `known`, or
    a drift row of a model version not in it, is left out: kept, it would be a row and a /metrics series for every
    name a node sends (sampled events are budgeted and swept, and name no series). A row the sweep would delete at
    once (`retention_cutoff`) is not stored: an event or drift count is left out, a minute's counts go to its
    series' `EXPIRED_MINUTE` row as the sweep's fold would put them (the /metrics counters count every request a node
    reported, however late).
    """
    cutoff, first_minute = retention_cutoff(now, retention_s)
    latest = now + skew_s
    ahead = 0.0
    versions = {(model, version) for model, version, _ in known}
    unknown_versions: set[tuple[str, str]] = set()

    def future(at: float) -> bool:
        nonlocal ahead
        if at > latest:
            ahead = max(ahead, at - now)
            return True
        return False

    def unknown(model: str, version: str, registered: bool) -> bool:
        if not registered:
            unknown_versions.add((model, version))
        return not registered

    minutes = [row for row in batch.minutes if not future(row.minute * 60)]
    events = [event for event in batch.events if not future(event.ts)]
    drift = [row for row in batch.drift if not future(row.minute * 60)]
    named_minutes = [
        row for row in minutes if not unknown(row.model, row.version, (row.model, row.version, row.variant) in known)
    ]
    named_drift = [row for row in drift if not unknown(row.model, row.version, (row.model, row.version) in versions)]
    stored_minutes = [row for row in named_minutes if row.minute >= first_minute]
    stored_events = [event for event in events if event.ts >= cutoff]
    stored_drift = [row for row in named_drift if row.minute >= first_minute]
    return ScreenedBatch(
        minutes=stored_minutes,
        expired_minutes=[row for row in named_minutes if row.minute < first_minute],
        future_minutes=[
            row for row in batch.minutes if row.minute * 60 > latest and (row.model, row.version, row.variant) in known
        ],
        events=stored_events,
        drift=stored_drift,
        future={
            "minutes": len(batch.minutes) - len(minutes),
            "events": len(batch.events) - len(events),
            "drift": len(batch.drift) - len(drift),
        },
        expired={
            "minutes": len(named_minutes) - len(stored_minutes),
            "events": len(events) - len(stored_events),
            "drift": len(named_drift) - len(stored_drift),
        },
        unknown={"minutes": len(minutes) - len(named_minutes), "drift": len(drift) - len(named_drift)},
        unknown_versions=sorted(unknown_versions),
        ahead_s=ahead,
    )


def chi_square_p_value(statistic: float, dof: int) -> float | None:
    """Survival function of the chi-square distribution (scipy), None without degrees of freedom."""
    if dof <= 0:
        return None
    from scipy.stats import chi2

    return float(chi2.sf(statistic, dof))


def tensor_drift(reference: DriftReference, counts: list[int]) -> TensorDrift:
    """PSI and a two-sample chi-square test of live bin counts against a reference (pure but for scipy)."""
    statistic, dof = chi_square_statistic(reference.counts, counts)
    value = psi(reference.counts, counts)
    return TensorDrift(
        tensor=reference.tensor,
        psi=round(value, 4),
        chi_square=round(statistic, 2),
        p_value=chi_square_p_value(statistic, dof),
        samples=sum(counts),
        drifting=value > PSI_DRIFT,
    )


# The columns that, with the node, key a stored minute row (`MinuteRow.key`) and a stored drift row (`DriftRow.key`),
# and the columns of counts they hold (a minute's in `MinuteRow`'s order).
_MINUTE_KEY = (TelemetryMinute.model, TelemetryMinute.version, TelemetryMinute.variant, TelemetryMinute.minute)
_MINUTE_COUNTS = (
    TelemetryMinute.requests, TelemetryMinute.errors, TelemetryMinute.items, TelemetryMinute.latency_sum_us,
    TelemetryMinute.queue_sum_us, TelemetryMinute.latency, TelemetryMinute.client_errors, TelemetryMinute.shed,
)  # fmt: skip
_DRIFT_KEY = (TelemetryDrift.model, TelemetryDrift.version, TelemetryDrift.minute, TelemetryDrift.tensor)


# What `_stored_counts` reads, by table: the node column, the key columns and the columns of counts.
_LOOKUPS: dict[str, tuple[InstrumentedAttribute[str], Sequence[InstrumentedAttribute[Any]], Sequence[Any]]] = {
    "minutes": (TelemetryMinute.node_id, _MINUTE_KEY, _MINUTE_COUNTS),
    "drift": (TelemetryDrift.node_id, _DRIFT_KEY, (TelemetryDrift.counts,)),
}


@functools.cache
def _lookup(table: str, size: int) -> Select[Any]:
    """The statement that reads `size` rows of `table` (`_LOOKUPS`) by primary key, its values bound as `node` and
    `k{i}_{j}` (the j-th key column of the i-th row): one statement per size, built and compiled once."""
    node, key, counts = _LOOKUPS[table]
    lookups = (
        and_(node == bindparam("node"), *(column == bindparam(f"k{i}_{j}") for j, column in enumerate(key)))
        for i in range(size)
    )
    return select(*key, *counts).where(or_(*lookups))


def _stored_counts(
    session: Session, table: str, node_id: str, keys: Iterable[tuple[Any, ...]]
) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """The counts of `node_id`'s stored rows of `table` (`_LOOKUPS`) whose keys are among `keys`, by key: a statement
    per LOOKUP_CHUNK keys (primary-key lookups), not one per row."""
    width = len(_LOOKUPS[table][1])
    wanted = sorted(keys)
    found: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for start in range(0, len(wanted), LOOKUP_CHUNK):
        chunk = wanted[start : start + LOOKUP_CHUNK]
        values = {f"k{i}_{j}": value for i, key in enumerate(chunk) for j, value in enumerate(key)}
        for row in session.execute(_lookup(table, len(chunk)), {"node": node_id, **values}):
            found[tuple(row[:width])] = tuple(row[width:])
    return found


def _add_minutes(session: Session, node_id: str, rows: Iterable[MinuteRow]) -> None:
    """Add `rows` to the node's stored minute rows of the same key, and store the others (rows of one key add up):
    the stored rows read a statement per LOOKUP_CHUNK keys, written in bulk.

    Raises:
        TelemetryError: a sum would pass MAX_COUNT.
    """
    rows = list(rows)
    stored = _stored_counts(session, "minutes", node_id, {row.key for row in rows})
    totals: dict[tuple[Any, ...], MinuteRow] = {}
    for row in rows:
        total = totals.get(row.key)
        if total is None:
            counts = stored.get(row.key)
            if counts is None:
                totals[row.key] = replace(row)  # its own: adding to it leaves the batch's row as it came
                continue
            total = totals[row.key] = MinuteRow(*row.key, *counts)
        add_counts(total, row)
        sums = (total.requests, total.items, total.latency_sum_us, total.queue_sum_us)
        if max(*sums, *total.latency) > MAX_COUNT:  # errors are at most requests
            raise TelemetryError(f"minute row {row.key} would count more than {MAX_COUNT} with this batch")
    values = {
        key: {
            "node_id": node_id, "model": t.model, "version": t.version, "variant": t.variant, "minute": t.minute,
            "requests": t.requests, "errors": t.errors, "items": t.items, "latency_sum_us": t.latency_sum_us,
            "queue_sum_us": t.queue_sum_us, "latency": list(t.latency), "client_errors": t.client_errors,
            "shed": t.shed,
        }
        for key, t in totals.items()
    }  # fmt: skip
    _write(session, TelemetryMinute, values, stored)


def _add_drift(
    session: Session, node_id: str, rows: Iterable[DriftRow], stored: dict[tuple[Any, ...], tuple[Any, ...]]
) -> None:
    """Add `rows`' counts to the node's stored drift rows of the same key (`stored`: `_stored_counts` of at least
    their keys), and store the others (rows of one key add up; a row binned otherwise than the counts it would add
    to is left out), written as `_add_minutes` writes.

    Raises:
        TelemetryError: a sum would pass MAX_COUNT.
    """
    rows = list(rows)
    totals: dict[tuple[Any, ...], list[int]] = {}
    for row in rows:
        current = totals.get(row.key)
        if current is None:
            found = stored.get(row.key)
            if found is None:
                totals[row.key] = list(row.counts)
                continue
            current = list(found[0])
        if len(current) != len(row.counts):
            continue
        counts = [a + b for a, b in zip(current, row.counts, strict=True)]
        if max(counts, default=0) > MAX_COUNT:  # as for the minutes' counts
            raise TelemetryError(f"drift of {row.tensor} would count more than {MAX_COUNT} with this batch")
        totals[row.key] = counts
    values = {
        key: {"node_id": node_id, "model": key[0], "version": key[1], "minute": key[2], "tensor": key[3], "counts": c}
        for key, c in totals.items()
    }
    _write(session, TelemetryDrift, values, stored)


def _write(
    session: Session,
    table: type[TelemetryMinute | TelemetryDrift],
    values: dict[tuple[Any, ...], dict[str, Any]],
    stored: dict[tuple[Any, ...], tuple[Any, ...]],
) -> None:
    """Insert the rows of `values` not `stored`, and update the others by primary key: a bulk statement each."""
    inserts = [row for key, row in values.items() if key not in stored]
    updates = [row for key, row in values.items() if key in stored]
    if inserts:
        session.execute(insert(table), inserts)
    if updates:
        session.execute(update(table), updates)


class TelemetryService:
    """Ingest and queries. `exporters` get every stored batch (OTLP forwarding, say) with the rows ingest kept (none
    dated past FUTURE_SKEW_S; minutes older than the retention with their own minute, which they were counted in).
    `retention_s` is what ingest holds a late row to (`screen`); the sweep is given its own."""

    def __init__(self, db: Database, clock: Callable[[], float], retention_s: float) -> None:
        self._db = db
        self._clock = clock
        self._retention_s = retention_s
        self._event_budget = RecordBudget(EVENT_BURST, EVENTS_PER_S)  # per node, in memory, per replica
        self._drift_budget = RecordBudget(DRIFT_BURST, DRIFT_ROWS_PER_S)  # the same
        self.counters = IngestCounters()
        self.exporters: list[Callable[[str, str, Batch], None]] = []

    # --- ingest -----------------------------------------------------------------------------------------

    def ingest(self, node_id: str, payload: bytes) -> IngestResult:
        """Store a node's batch once; a batch already stored is acknowledged again and not stored twice.

        Its rows are sorted by the server's clock and the registry first (`screen`): those dated more than
        FUTURE_SKEW_S ahead, and those naming a variant or model version the registry does not know, are left out,
        counted in the node's dropped telemetry (FUTURE_KINDS, UNKNOWN_KINDS), in `counters.future` and
        `counters.unknown` and in a warning that names the node; those older than the retention are not stored (a
        minute's counts are folded). Sampled events and drift rows past the node's budget are left out and counted
        (OVER_BUDGET_KIND, DRIFT_OVER_BUDGET_KIND). The batch itself is stored and acknowledged all the same:
        refused, the node would drop its good rows too.

        Raises:
            TelemetryError: the payload does not decode, or counts added to those stored (minutes, drift,
                dropped) would pass MAX_COUNT (many batches of the same minute: a node's claim).
            Forbidden: the batch says it comes from another node.
            NotFound: no such node.
            StoreError: the database failed.
        """
        batch = decode_batch(payload)
        if batch.node_id != node_id:
            raise Forbidden(f"batch names node {batch.node_id!r}; a node may only send its own telemetry")
        now = self._clock()
        screened = screen(batch, now, self._retention_s, self._registered(batch))
        granted = self._event_budget.take(node_id, len(screened.events), now)
        over_budget = {OVER_BUDGET_KIND: len(screened.events) - granted}
        if over_budget[OVER_BUDGET_KIND]:
            kept = sorted(screened.events, key=lambda event: -event.priority)[:granted]  # errors first (stable)
            screened = replace(screened, events=sorted(kept, key=lambda event: event.ts))
            log.warning(
                "node %s sent more sampled events than its budget (%d, then %g a second); left out %s",
                node_id, EVENT_BURST, EVENTS_PER_S, plural(over_budget[OVER_BUDGET_KIND], "event"),
            )  # fmt: skip
        try:
            stored, node_name = self._store(node_id, batch, screened, len(payload), now, over_budget)
        except Conflict:  # the same batch raced in through another connection and won
            stored, node_name = False, ""
        if stored and over_budget.get(DRIFT_OVER_BUDGET_KIND):
            log.warning(
                "node %s sent more new drift rows than its budget (%d, then %g a second); left out %s",
                node_id, DRIFT_BURST, DRIFT_ROWS_PER_S, plural(over_budget[DRIFT_OVER_BUDGET_KIND], "drift row"),
            )  # fmt: skip
        with self.counters.lock:
            if stored:
                self.counters.batches += 1
                self.counters.bytes += len(payload)
                self.counters.minutes += len(screened.minutes)
                self.counters.events += len(screened.events)
                for kind, count in screened.future.items():
                    self.counters.future[kind] += count
                for kind, count in screened.expired.items():
                    self.counters.expired[kind] += count
                for kind, count in screened.unknown.items():
                    self.counters.unknown[kind] += count
            else:
                self.counters.duplicates += 1
        if stored and any(screened.future.values()):
            log.warning(
                "node %s (%s) sent telemetry dated up to %.0fs past the server's clock (more than %s: is its clock"
                " right?); left out %s%s",
                node_name, node_id, screened.ahead_s, duration(FUTURE_SKEW_S),
                ", ".join(plural(count, EXPIRED_NOUNS[kind]) for kind, count in screened.future.items() if count),
                f" ({plural(late, 'request')} in those minutes: counted in the totals on /metrics, not in any time"
                " window)" if (late := sum(row.requests for row in screened.future_minutes)) else "",
            )  # fmt: skip
        if stored and any(screened.unknown.values()):
            names = [f"{model} {version}" for model, version in screened.unknown_versions]
            log.warning(
                "node %s (%s) sent telemetry of %s the registry does not know (%s%s); left out %s",
                node_name, node_id, plural(len(names), "model version"), ", ".join(names[:3]),
                ", ..." if len(names) > 3 else "",
                ", ".join(plural(count, EXPIRED_NOUNS[kind]) for kind, count in screened.unknown.items() if count),
            )  # fmt: skip
        if stored:
            exported = replace(
                batch,
                minutes=screened.minutes + screened.expired_minutes,
                events=screened.events,
                drift=screened.drift,
            )
            for export in self.exporters:
                try:
                    export(node_id, node_name, exported)
                except Exception as exc:  # an exporter must never make the node resend a stored batch
                    log.warning("telemetry exporter failed: %s", exc)
        return IngestResult(seq=batch.seq, stored=stored)

    def _registered(self, batch: Batch) -> frozenset[tuple[str, str, str]]:
        """The registry's (model, version, variant)s of the models `batch` names (its own short read)."""
        names = sorted({row.model for row in batch.minutes} | {row.model for row in batch.drift})
        with self._db.transaction() as session:
            return frozenset(
                (model, version, variant)
                for start in range(0, len(names), LOOKUP_CHUNK)
                for model, version, variant in session.execute(
                    select(Model.name, ModelVersion.version, Variant.variant)
                    .join(ModelVersion, ModelVersion.model_id == Model.id)
                    .join(Variant, Variant.version_id == ModelVersion.id)
                    .where(Model.name.in_(names[start : start + LOOKUP_CHUNK]))
                )
            )

    def _within_drift_budget(
        self, node_id: str, rows: list[DriftRow], stored: Mapping[tuple[Any, ...], Any], now: float
    ) -> tuple[list[DriftRow], int]:
        """The drift rows of a batch the node's budget lets it store, and how many were left out. Only a row that
        would make a new stored row (a key neither stored nor met earlier in the batch) is charged: an agent sends
        the minute under way in each upload (every 10 s), and a batch resent is not stored at all. Past the budget
        the newest minutes' new keys are kept (what the drift gates read); rows adding to stored keys always are."""
        new_keys = list(dict.fromkeys(row.key for row in rows if row.key not in stored))
        if not new_keys:
            return rows, 0
        granted = self._drift_budget.take(node_id, len(new_keys), now)
        if granted == len(new_keys):
            return rows, 0
        kept = set(sorted(new_keys, key=lambda key: -key[2])[:granted])  # the newest minutes (stable)
        within = [row for row in rows if row.key in stored or row.key in kept]
        return within, len(rows) - len(within)

    def _store(
        self,
        node_id: str,
        batch: Batch,
        screened: ScreenedBatch,
        size: int,
        now: float,
        over_budget: dict[str, int],
    ) -> tuple[bool, str]:
        """Store `batch`'s record and `screened`'s rows in one transaction; (False, name) when it is stored already.
        `over_budget`: the rows left out past the node's budgets, by their dropped kind (the drift budget's are
        added here: only a stored batch's rows that make a new row are charged to it)."""
        with self._db.transaction() as session:
            node = session.get(Node, node_id)
            if node is None or node.revoked_at is not None:
                raise NotFound(f"no node {node_id!r}")
            if session.get(TelemetryBatch, (node_id, batch.seq)) is not None:
                return False, node.name
            session.add(
                TelemetryBatch(
                    node_id=node_id,
                    seq=batch.seq,
                    received_at=now,
                    bytes=size,
                    minutes=len(batch.minutes),
                    events=len(batch.events),
                )
            )
            expired = (
                replace(row, minute=EXPIRED_MINUTE) for row in [*screened.expired_minutes, *screened.future_minutes]
            )
            _add_minutes(session, node_id, [*screened.minutes, *expired])
            session.add_all(
                TelemetryEvent(
                    node_id=node_id, ts=e.ts, model=e.model, version=e.version, variant=e.variant,
                    latency_us=e.latency_us, queue_us=e.queue_us, batch=e.batch, status=e.status, tier=e.tier,
                    priority=e.priority, summary=e.summary,
                )
                for e in screened.events
            )  # fmt: skip
            stored_drift = _stored_counts(session, "drift", node_id, {row.key for row in screened.drift})
            drift, over_budget[DRIFT_OVER_BUDGET_KIND] = self._within_drift_budget(
                node_id, screened.drift, stored_drift, now
            )
            _add_drift(session, node_id, drift, stored_drift)
            # what the node's buffer dropped, and what was left out here (kinds no batch names)
            future = {FUTURE_KINDS[kind]: count for kind, count in screened.future.items()}
            unknown = {UNKNOWN_KINDS[kind]: count for kind, count in screened.unknown.items()}
            for kind, count in {**batch.dropped, **future, **unknown, **over_budget}.items():
                if count:
                    dropped = session.get(TelemetryDropped, (node_id, kind))
                    if dropped is None:
                        session.add(TelemetryDropped(node_id=node_id, kind=kind, count=count))
                    elif dropped.count + count > MAX_COUNT:  # as for the minutes' counts
                        raise TelemetryError(f"dropped {kind} would count more than {MAX_COUNT} with this batch")
                    else:
                        dropped.count += count
            return True, node.name

    # --- retention --------------------------------------------------------------------------------------

    def sweep(
        self,
        retention_s: float,
        chunk: int = SWEEP_CHUNK,
        pause_s: float = SWEEP_PAUSE_S,
        stop: threading.Event | None = None,
    ) -> dict[str, int]:
        """Delete what is older than `retention_s` (before `now - retention_s` on the server's clock), `chunk`
        rows per statement and transaction; return the rows deleted by kind (`EXPIRED_KINDS`), also added to
        `counters.expired`. Idempotent: two replicas sweeping at once only delete fewer rows each. Once `stop` is
        set, no further chunk starts (the server is shutting down; the next sweep goes on).

        Minutes and drift counts go by their minute, events by their time (`retention_cutoff`). A deleted minute
        row's counts are added to its series' `EXPIRED_MINUTE` row (`_fold_minutes`), so that /metrics' request
        counters never go down.

        Exactly-once records (`telemetry_batches`): a node's resend of a stored batch is refused because its
        (node, seq) row is there, so a row may go only once that batch can never be sent again. A node's buffer
        holds one sealed batch at a time and deletes it only when the server acknowledged it (or refused it for
        good); it seals the next one, with a higher seq, only after that (`agent.telemetry.TelemetryBuffer.seal`;
        a new buffer numbers above any older one). So once a node's batch with a higher seq is stored, the node
        had the acknowledgement of every lower one, and those are never resent: a record is deleted only when it
        is older than the retention AND the node has a newer record. Each node's newest record is kept however
        old: its acknowledgement may have been lost (a node offline since, for months), and its resend must
        still be refused.

        Raises:
            StoreError: the database failed (what was deleted before stays deleted; the next sweep goes on).
        """
        cutoff, first_minute = retention_cutoff(self._clock(), retention_s)
        newer = select(_NewerBatch.seq).where(
            _NewerBatch.node_id == TelemetryBatch.node_id, _NewerBatch.seq > TelemetryBatch.seq
        )
        steps: dict[str, Callable[[], int]] = {
            "minutes": functools.partial(self._fold_minutes, first_minute, chunk),
            "events": functools.partial(self._db.delete_chunk, TelemetryEvent, TelemetryEvent.ts < cutoff, chunk),
            "drift": functools.partial(
                self._db.delete_chunk, TelemetryDrift, TelemetryDrift.minute < first_minute, chunk
            ),
            "batches": functools.partial(
                self._db.delete_chunk, TelemetryBatch, (TelemetryBatch.received_at < cutoff) & newer.exists(), chunk
            ),
        }
        return {
            kind: in_chunks(step, chunk, pause_s, stop, functools.partial(self._count_expired, kind))
            for kind, step in steps.items()
        }

    def _count_expired(self, kind: str, count: int) -> None:
        with self.counters.lock:
            self.counters.expired[kind] += count

    def _fold_minutes(self, first_minute: int, chunk: int) -> int:
        """Delete up to `chunk` minute rows from before `first_minute`, adding their counts to their series'
        `EXPIRED_MINUTE` row in the same transaction; return how many. That row is out of every query's reach
        (queries start at a minute >= 0) but in `totals()`: the /metrics counters read from the stored minutes
        never go down, which Prometheus would take for a counter reset (a spike in `rate()` every sweep). Two
        replicas' folds (a lease handed over mid-sweep) take turns (`serialize`): each adds only rows still there."""
        with self._db.transaction() as session:
            serialize(session, RETENTION)
            rows = session.scalars(
                select(TelemetryMinute)
                # above EXPIRED_MINUTE (the only negative minute): one range of the minute index
                .where(TelemetryMinute.minute > EXPIRED_MINUTE, TelemetryMinute.minute < first_minute)
                .limit(chunk)
            ).all()
            folded: dict[tuple[str, str, str, str], TelemetryMinute] = {}
            for row in rows:
                series = (row.node_id, row.model, row.version, row.variant)
                total = folded.get(series) or session.get(TelemetryMinute, (*series, EXPIRED_MINUTE))
                if total is None:
                    total = TelemetryMinute(
                        node_id=row.node_id, model=row.model, version=row.version, variant=row.variant,
                        minute=EXPIRED_MINUTE, requests=0, errors=0, client_errors=0, shed=0, items=0,
                        latency_sum_us=0, queue_sum_us=0, latency=[0] * BUCKETS,
                    )  # fmt: skip
                    session.add(total)
                folded[series] = total
                add_counts(total, row)
                session.delete(row)
            return len(rows)

    # --- queries ----------------------------------------------------------------------------------------

    def minutes(
        self, model: str, version: str | None, node: str | None, since: float, max_rows: int | None = None
    ) -> tuple[list[MinuteView], list[NodeSummary]]:
        """Per node and minute rows, and per node and version summaries with drift, since `since` (epoch s); at
        most `max_rows` stored minute (and drift) rows are read, else the query is refused.

        Raises:
            NotFound: no such model, or no such node name.
            ProtocolError: more than `max_rows` rows match.
            StoreError: the database failed.
        """
        first_minute = int(since // 60)
        with self._db.transaction() as session:
            if session.scalar(select(Model.id).where(Model.name == model)) is None:
                raise NotFound(f"no model {model!r}")
            query = (
                select(TelemetryMinute, Node.name)
                .join(Node, Node.id == TelemetryMinute.node_id)
                .where(TelemetryMinute.model == model, TelemetryMinute.minute >= first_minute)
            )
            drift_query = (
                select(TelemetryDrift, Node.name)
                .join(Node, Node.id == TelemetryDrift.node_id)
                .where(TelemetryDrift.model == model, TelemetryDrift.minute >= first_minute)
            )
            if version is not None:
                query = query.where(TelemetryMinute.version == version)
                drift_query = drift_query.where(TelemetryDrift.version == version)
            if node is not None:
                node_id = session.scalar(select(Node.id).where(Node.name == node))
                if node_id is None:
                    raise NotFound(f"no node named {node!r}")
                query = query.where(TelemetryMinute.node_id == node_id)
                drift_query = drift_query.where(TelemetryDrift.node_id == node_id)
            if max_rows is not None:
                query, drift_query = query.limit(max_rows + 1), drift_query.limit(max_rows + 1)
            minute_rows = [(row, name) for row, name in session.execute(query)]
            drift_rows = [(row, name) for row, name in session.execute(drift_query)]
            if max_rows is not None and max(len(minute_rows), len(drift_rows)) > max_rows:
                raise ProtocolError(
                    f"more than {max_rows} rows of telemetry match: ask for one node, one version or a shorter time"
                )
            references = self._references(session, model)
            dropped_rows = session.execute(select(TelemetryDropped)).scalars().all()
            dropped: dict[str, dict[str, int]] = defaultdict(dict)
            for d in dropped_rows:
                dropped[d.node_id][d.kind] = d.count

        per_minute: dict[tuple[str, str, str, int], _Traffic] = defaultdict(_Traffic)
        per_node: dict[tuple[str, str, str], _Traffic] = defaultdict(_Traffic)
        for row, name in minute_rows:
            per_minute[(row.node_id, name, row.version, row.minute)].add(row)
            per_node[(row.node_id, name, row.version)].add(row)
        drift_counts: dict[tuple[str, str, str, str], list[int]] = {}
        for drift_row, name in drift_rows:
            key4 = (drift_row.node_id, name, drift_row.version, drift_row.tensor)
            current = drift_counts.get(key4)
            drift_counts[key4] = (
                list(drift_row.counts)
                if current is None or len(current) != len(drift_row.counts)
                else [a + b for a, b in zip(current, drift_row.counts, strict=True)]
            )

        ms = percentile_ms
        views = [
            MinuteView(
                node=name, node_id=node_id, model=model, version=ver, minute=minute, requests=acc.requests,
                errors=acc.errors, client_errors=acc.client_errors, shed=acc.shed, n=sum(acc.latency),
                p50_ms=ms(acc.latency, 0.5), p95_ms=ms(acc.latency, 0.95), p99_ms=ms(acc.latency, 0.99),
            )
            for (node_id, name, ver, minute), acc in sorted(per_minute.items(), key=lambda kv: (kv[0][3], kv[0][1]))
        ]  # fmt: skip
        summaries = []
        for (node_id, name, ver), acc in sorted(per_node.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            drift = [
                tensor_drift(reference, drift_counts[(node_id, name, ver, reference.tensor)])
                for reference in references.get(ver, ())
                if (node_id, name, ver, reference.tensor) in drift_counts
            ]
            rates = error_rates(acc.requests, acc.errors, acc.client_errors, acc.shed)
            summaries.append(
                NodeSummary(
                    node=name, node_id=node_id, model=model, version=ver, requests=acc.requests, errors=acc.errors,
                    client_errors=acc.client_errors, shed=acc.shed, error_rate=rates.error_rate,
                    client_error_rate=rates.client_error_rate, shed_rate=rates.shed_rate, n=sum(acc.latency),
                    p50_ms=ms(acc.latency, 0.5), p95_ms=ms(acc.latency, 0.95), p99_ms=ms(acc.latency, 0.99),
                    drift=drift, dropped=dropped.get(node_id, {}),
                )
            )  # fmt: skip
        return views, summaries

    @staticmethod
    def _references(session: Session, model: str) -> dict[str, tuple[DriftReference, ...]]:
        """Drift references of each version of `model`: those of its first variant that carries any."""
        out: dict[str, tuple[DriftReference, ...]] = {}
        rows = session.execute(
            select(ModelVersion.version, Variant.manifest)
            .join(Variant, Variant.version_id == ModelVersion.id)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(Model.name == model)
            .order_by(Variant.variant)
        )
        for version, manifest in rows:
            if version not in out and manifest.get("drift"):
                try:
                    out[version] = tuple(drift_references(manifest["drift"]))
                except TelemetryError as exc:  # stored before a check the upload makes now (a tensor twice)
                    log.warning("model %s %s: its drift references are not usable: %s", model, version, exc)
                    out[version] = ()
        return out

    def drift_by_node(
        self, model: str, version: str, since: float, min_samples: int = 200
    ) -> dict[str, DriftFigure] | None:
        """Node id -> its drift since `since`, for rollout drift gates: the largest PSI over the version's tensors,
        and the requests it served in that window (what the PSI rests on). None when the version's package has no
        drift reference. A tensor with fewer than `min_samples` counted values on a node is left out.

        Raises:
            StoreError: the database failed.
        """
        first_minute = int(since // 60)
        with self._db.transaction() as session:
            references = self._references(session, model).get(version, ())
            if not references:
                return None
            rows = session.execute(
                select(TelemetryDrift.node_id, TelemetryDrift.tensor, TelemetryDrift.counts).where(
                    TelemetryDrift.model == model,
                    TelemetryDrift.version == version,
                    TelemetryDrift.minute >= first_minute,
                )
            ).all()
            served = session.execute(  # answered requests: each one adds to the drift counts
                select(TelemetryMinute.node_id, func.sum(TelemetryMinute.requests - TelemetryMinute.errors))
                .where(
                    TelemetryMinute.model == model,
                    TelemetryMinute.version == version,
                    TelemetryMinute.minute >= first_minute,
                )
                .group_by(TelemetryMinute.node_id)
            ).all()
        counts: dict[tuple[str, str], list[int]] = {}
        for node_id, tensor, values in rows:
            current = counts.get((node_id, tensor))
            counts[(node_id, tensor)] = (
                list(values)
                if current is None or len(current) != len(values)
                else [a + b for a, b in zip(current, values, strict=True)]
            )
        worst: dict[str, float] = {}
        for reference in references:
            for (node_id, tensor), live in counts.items():
                if tensor == reference.tensor and sum(live) >= min_samples and len(live) == len(reference.counts):
                    worst[node_id] = max(worst.get(node_id, 0.0), psi(reference.counts, live))
        requests = {node_id: int(total or 0) for node_id, total in served}
        return {
            node_id: DriftFigure(worst.get(node_id), requests.get(node_id, 0)) for node_id in requests.keys() | worst
        }

    def drift_minutes(self, model: str, node_id: str, since: float) -> list[dict[str, Any]]:
        """One node's drift minute by minute since `since`: per minute and version, the largest PSI over the
        version's tensors against its reference and the values it rests on (the console's drift chart). Empty
        when the version's package has no drift reference.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            references = self._references(session, model)
            rows = session.execute(
                select(TelemetryDrift.minute, TelemetryDrift.version, TelemetryDrift.tensor, TelemetryDrift.counts)
                .where(
                    TelemetryDrift.model == model,
                    TelemetryDrift.node_id == node_id,
                    TelemetryDrift.minute >= int(since // 60),
                )
                .order_by(TelemetryDrift.minute)
            ).all()
        worst: dict[tuple[int, str], tuple[float, int]] = {}
        for minute, version, tensor, counts in rows:
            live = [int(c) for c in counts]
            total = sum(live)
            for reference in references.get(version, ()):
                if reference.tensor == tensor and len(live) == len(reference.counts) and total:
                    best, samples = worst.get((minute, version), (0.0, 0))
                    worst[(minute, version)] = (max(best, psi(reference.counts, live)), samples + total)
        return [
            {"minute": minute, "version": version, "psi": round(value, 4), "samples": samples}
            for (minute, version), (value, samples) in sorted(worst.items())
        ]

    def totals(self) -> dict[tuple[str, str, str], tuple[int, int, int, int]]:
        """(node name, model, version) -> (requests, errors, client errors, shed) over all stored minutes (those the
        retention deleted included, in their `EXPIRED_MINUTE` rows), for /metrics.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.execute(
                select(
                    Node.name,
                    TelemetryMinute.model,
                    TelemetryMinute.version,
                    func.sum(TelemetryMinute.requests),
                    func.sum(TelemetryMinute.errors),
                    func.sum(TelemetryMinute.client_errors),
                    func.sum(TelemetryMinute.shed),
                )
                .join(Node, Node.id == TelemetryMinute.node_id)
                .group_by(Node.name, TelemetryMinute.model, TelemetryMinute.version)
            ).all()
        return {
            (name, model, version): (int(req or 0), int(err or 0), int(client or 0), int(shed or 0))
            for name, model, version, req, err, client, shed in rows
        }
