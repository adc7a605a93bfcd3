"""Telemetry shared by node and control plane: latency histograms, event sampling, drift statistics, and
the columnar, zstd-compressed batch format that carries them, all pure.

A node keeps, for every (model, version, variant, minute), exact counts and a latency histogram of every
request (`errors` counts every failed request, `client_errors` those of them refused as the caller's fault and
`shed` those shed by admission control: a batch from a node older than either column decodes with zeros in it);
individual events are sampled (every error and slow request, a share of the rest). Batches are numbered per node;
the control plane stores each (node, seq) once, whatever is resent.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from strata.core.errors import StrataError

# Latency histogram bucket upper bounds in microseconds (1-2-5 series, 50 us to 10 s) plus +Inf.
LATENCY_BOUNDS_US: Final[tuple[int, ...]] = (
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
    100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000,
)  # fmt: skip
BUCKETS: Final = len(LATENCY_BOUNDS_US) + 1

# Event priorities: what a full buffer drops first is the lowest.
PRIORITY_SAMPLED: Final = 0
PRIORITY_SLOW: Final = 1
PRIORITY_ERROR: Final = 2
PRIORITY_NAMES: Final = {PRIORITY_SAMPLED: "sampled", PRIORITY_SLOW: "slow", PRIORITY_ERROR: "error"}

BATCH_FORMAT: Final = "strata.telemetry/v1"
# What one batch may hold, decompressed and in rows. A node seals at most these (`agent.telemetry`), whose largest
# batch (every row of every kind, every name as long as its column) is 3.5 MB decompressed. A batch is a node's
# claim: a 5 KB upload that inflated to 55 MB of 2.5 million events took the control plane 13.5 s and 750 MB to
# parse (64 MB allowed).
MAX_BATCH_BYTES: Final = 8 << 20
MAX_BATCH_EVENTS: Final = 20_000
MAX_BATCH_MINUTES: Final = 2_000
MAX_BATCH_DRIFT: Final = 20_000  # what a node seals; the control plane takes up to DRIFT_ROWS_TAKEN
# An agent from before MAX_BATCH_DRIFT sealed every drift row in one batch (32 rows a minute: 26 hours of an outage).
DRIFT_ROWS_TAKEN: Final = 50_000
# What the rows' texts may add up to once each row holds its own (texts are sent once and named by index).
MAX_BATCH_TEXT: Final = 64 << 20
# JSON's cost is in its values, not its bytes: 8 MiB of `[],` or `{},` took 0.5 s of the GIL and 209 MB to parse.
# Commas and opening brackets are counted before parsing, against what the largest honest batch holds (658,035 and
# 62,034; with 20,000 distinct event summaries, each a small JSON text of its own, about 110,000 brackets).
MAX_BATCH_COMMAS: Final = 1_500_000
MAX_BATCH_BRACKETS: Final = 200_000
# The most any count of a batch may be (a minute's, an event's microseconds, drift and dropped counts, the minute
# and sequence numbers, an event's time in ms), and what the control plane's sums may reach: JSON numbers stay exact
# up to it in every reader (the console's JavaScript too), and it is far inside a BIGINT, SQLite's or PostgreSQL's.
MAX_COUNT: Final = 2**53 - 1
INT32_MAX: Final = 2**31 - 1  # an event's batch size and priority: INTEGER columns
# The longest texts a batch may carry, as the control plane's columns hold them (PostgreSQL refuses longer ones)
MAX_NAME: Final = 128  # a model, version or variant (`core.package.check_name`)
MAX_STATUS: Final = 32
MAX_TIER: Final = 16
MAX_DROPPED_KIND: Final = 32  # what a node's buffer dropped, by kind (`events_sampled`)
# A drift reference's tensor name: a longer one gets no reference (and a node sends no drift for it), so every
# name a batch carries fits the control plane's column
MAX_TENSOR: Final = 256
# What a node's buffer may say it dropped, by kind (`strata.agent.telemetry`): the control plane keeps one row per
# (node, kind) for good, so a batch naming any other kind is refused rather than given a row of its own.
DROPPED_KINDS: Final = (
    "events_sampled",
    "events_slow",
    "events_error",
    "minutes",
    "minute_requests",
    "lost",
    "rejected",
)
DRIFT_BINS: Final = 10
DRIFT_MAX_ELEMENTS: Final = 4096  # per tensor per request: larger tensors are strided down to this


class TelemetryError(StrataError):
    """A telemetry batch that does not decode or does not hold what the format says."""

    code = "telemetry_invalid"
    http_status = 422


def bucket_of(latency_us: float) -> int:
    """Index of the histogram bucket that counts `latency_us`."""
    return bisect.bisect_left(LATENCY_BOUNDS_US, latency_us)


def quantile_us(counts: Sequence[int], q: float) -> float | None:
    """The `q` quantile (0..1) of a latency histogram, interpolated linearly inside its bucket; None if empty.

    The overflow bucket reports its lower bound (the histogram cannot say more).
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            low = LATENCY_BOUNDS_US[index - 1] if index > 0 else 0
            if index >= len(LATENCY_BOUNDS_US):
                return float(low)
            high = LATENCY_BOUNDS_US[index]
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return float(LATENCY_BOUNDS_US[-1])


def min_samples(q: float) -> int:
    """The fewest requests a `q` quantile may rest on: enough that at least one lies beyond it (p50: 2, p95: 20,
    p99: 100). Fewer would report a number that is only the interpolation of one bucket, not a percentile."""
    return max(2, math.ceil(round(1 / (1 - q), 9)))


def percentile_ms(counts: Sequence[int], q: float) -> float | None:
    """The `q` quantile of a latency histogram in milliseconds (3 decimals), or None when it rests on fewer
    requests than `min_samples(q)`."""
    if sum(counts) < min_samples(q):
        return None
    value = quantile_us(counts, q)
    return round(value / 1000, 3) if value is not None else None


def event_priority(ok: bool, latency_us: float, slow_us: float, sample_rate: float, draw: float) -> int | None:
    """Whether to keep a request's event, and at which priority (None: aggregated only).

    Every error and every request slower than `slow_us` is kept; of the rest, those whose `draw` (uniform
    in [0, 1)) falls under `sample_rate`.
    """
    if not ok:
        return PRIORITY_ERROR
    if latency_us >= slow_us:
        return PRIORITY_SLOW
    if draw < sample_rate:
        return PRIORITY_SAMPLED
    return None


def minute_of(timestamp: float) -> int:
    """The epoch minute a timestamp falls in."""
    return int(timestamp // 60)


# --- drift ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftReference:
    """Bin edges of one tensor's value distribution at build time, and the reference counts in them."""

    tensor: str
    kind: str  # "input" or "output"
    edges: tuple[float, ...]  # DRIFT_BINS - 1 inner edges; bins are (-inf, e0], (e0, e1], ..., (e_last, inf)
    counts: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "kind": self.kind, "edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> DriftReference:
        """A reference as `build_reference` makes it: 1 to DRIFT_BINS - 1 finite, strictly increasing edges and
        one non-negative integer count more. Each bin costs every inference on every node (counted, summed and
        stored), so a reference with more bins is refused, not trimmed.

        Raises:
            TelemetryError: it is anything else.
        """
        if not isinstance(raw, Mapping):
            raise TelemetryError(f"drift reference must be an object, got {type(raw).__name__}")
        tensor, kind, edges, counts = raw.get("tensor"), raw.get("kind"), raw.get("edges"), raw.get("counts")
        if not isinstance(tensor, str) or kind not in ("input", "output"):
            raise TelemetryError("drift reference is malformed: 'tensor' must be a string, 'kind' input or output")
        if not isinstance(edges, list) or not isinstance(counts, list):
            raise TelemetryError(f"drift reference of {tensor[:64]!r} is malformed: 'edges' and 'counts' must be lists")
        if not 1 <= len(edges) <= DRIFT_BINS - 1 or len(counts) != len(edges) + 1:
            raise TelemetryError(
                f"drift reference of {tensor[:64]!r} has {len(edges)} edges and {len(counts)} counts; a reference "
                f"has 1 to {DRIFT_BINS - 1} edges and one count more"
            )
        if not all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) for e in edges):
            raise TelemetryError(f"drift reference of {tensor[:64]!r} has an edge that is not a finite number")
        if any(a >= b for a, b in itertools.pairwise(edges)):
            raise TelemetryError(f"drift reference of {tensor[:64]!r} has edges that do not increase")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise TelemetryError(f"drift reference of {tensor[:64]!r} has a count that is not a non-negative integer")
        return cls(tensor=tensor, kind=kind, edges=tuple(float(e) for e in edges), counts=tuple(counts))


def _strided(values: Any) -> Any:
    flat = values.reshape(-1)
    if flat.size > DRIFT_MAX_ELEMENTS:
        flat = flat[:: math.ceil(flat.size / DRIFT_MAX_ELEMENTS)]
    return flat


def build_reference(tensor: str, kind: str, samples: Any) -> DriftReference | None:
    """Decile edges of a tensor's values over reference samples (first axis = samples), and the counts.

    Repeated values collapse edges (a mostly-zero input has few bins). Returns None for non-numeric tensors,
    when the values are all equal (nothing to compare), or for a name longer than MAX_TENSOR.
    """
    import numpy as np

    if len(tensor) > MAX_TENSOR:
        return None
    array = np.asarray(samples)
    if array.dtype.kind not in "biuf" or array.size == 0:
        return None
    values = np.concatenate([_strided(row) for row in array]).astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    edges = np.unique(np.quantile(values, np.linspace(0, 1, DRIFT_BINS + 1)[1:-1]))
    if edges.size == 0 or values.min() == values.max():
        return None
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=edges.size + 1)
    return DriftReference(
        tensor=tensor, kind=kind, edges=tuple(float(e) for e in edges), counts=tuple(int(c) for c in counts)
    )


@functools.lru_cache(maxsize=256)
def _edges(edges: tuple[float, ...]) -> Any:
    """A reference's bin edges as a numpy array (converted once, not per request)."""
    import numpy as np

    array = np.asarray(edges, dtype=np.float64)
    array.flags.writeable = False
    return array


def bin_counts(reference: DriftReference, values: Any) -> list[int]:
    """Counts of a live tensor's values (strided to DRIFT_MAX_ELEMENTS) in the reference's bins."""
    import numpy as np

    return count_flat(reference, _strided(np.asarray(values)))


def count_flat(reference: DriftReference, flat: Any) -> list[int]:
    """Counts of every value of a flat array in the reference's bins (non-finite values left out)."""
    import numpy as np

    if flat.dtype.kind not in "biuf":
        return [0] * len(reference.counts)
    if flat.dtype.kind == "f":
        finite = np.isfinite(flat)
        if not finite.all():
            flat = flat[finite]
    indices = np.searchsorted(_edges(reference.edges), flat, side="left")
    counts: list[int] = np.bincount(indices, minlength=len(reference.counts)).tolist()
    return counts


def bin_counts_summed(reference: DriftReference, values: Any, sizes: Sequence[int]) -> list[int]:
    """What consecutive parts of `values` (flattened), `sizes[i]` elements in part i, count each alone in the
    reference's bins (`bin_counts`, which strides a part of more than DRIFT_MAX_ELEMENTS), summed: a batch's
    counts as its requests would give them one by one.

    Raises:
        ValueError: the sizes do not add up to the tensor's.
    """
    import numpy as np

    flat = np.asarray(values).reshape(-1)
    if sum(sizes) != flat.size:
        raise ValueError(f"parts of {sum(sizes)} elements do not split a tensor of {flat.size}")
    if all(size <= DRIFT_MAX_ELEMENTS for size in sizes):  # nothing strided: the parts' counts are the whole's
        return count_flat(reference, flat)
    total = [0] * len(reference.counts)
    for a, b in itertools.pairwise(np.cumsum([0, *sizes])):
        total = [x + y for x, y in zip(total, bin_counts(reference, flat[a:b]), strict=True)]
    return total


def drift_references(raw: Mapping[str, Any]) -> list[DriftReference]:
    """The drift references a package manifest's `drift` section holds (empty when it has none), less any whose
    tensor name is longer than MAX_TENSOR (a package built before that limit): its drift could not be sent.

    Raises:
        TelemetryError: the section or a reference in it is malformed (see `DriftReference.from_json`), or two
            references name one tensor (a node keeps drift by tensor: it would count the tensor's values twice in
            one row, and hold them twice).
    """
    tensors = raw.get("tensors", [])
    if not isinstance(tensors, list):
        raise TelemetryError("the drift section's 'tensors' must be a list")
    references = [DriftReference.from_json(item) for item in tensors]
    seen: set[str] = set()
    for reference in references:
        if reference.tensor in seen:
            raise TelemetryError(f"the drift section has more than one reference of tensor {reference.tensor[:64]!r}")
        seen.add(reference.tensor)
    return [reference for reference in references if len(reference.tensor) <= MAX_TENSOR]


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = 1e-4) -> float:
    """Population stability index between two binned distributions (counts or fractions).

    Conventional reading: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 a significant shift.
    """
    total_e, total_a = sum(expected), sum(actual)
    if total_e <= 0 or total_a <= 0:
        return 0.0
    value = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe = max(e / total_e, floor)
        pa = max(a / total_a, floor)
        value += (pa - pe) * math.log(pa / pe)
    return value


def chi_square_statistic(expected: Sequence[float], actual: Sequence[float]) -> tuple[float, int]:
    """Two-sample chi-square homogeneity statistic of two binned samples, and its degrees of freedom."""
    total_e, total_a = sum(expected), sum(actual)
    if total_e <= 0 or total_a <= 0:
        return 0.0, 0
    grand = total_e + total_a
    statistic = 0.0
    bins = 0
    for e, a in zip(expected, actual, strict=True):
        column = e + a
        if column == 0:
            continue
        bins += 1
        for observed, row_total in ((e, total_e), (a, total_a)):
            want = row_total * column / grand
            statistic += (observed - want) ** 2 / want
    return statistic, max(bins - 1, 0)


# --- the batch format ---------------------------------------------------------------------------------


class MinuteCounts(Protocol):
    """The counts of a minute: a `MinuteRow`, or the control plane's stored row of one."""

    requests: int
    errors: int
    client_errors: int
    shed: int
    items: int
    latency_sum_us: int
    queue_sum_us: int
    latency: list[int]


def add_counts(total: MinuteCounts, row: MinuteCounts) -> None:
    """Add `row`'s counts and latency histogram to `total`'s."""
    total.requests += row.requests
    total.errors += row.errors
    total.client_errors += row.client_errors
    total.shed += row.shed
    total.items += row.items
    total.latency_sum_us += row.latency_sum_us
    total.queue_sum_us += row.queue_sum_us
    total.latency = [a + b for a, b in zip(total.latency, row.latency, strict=True)]


@dataclass
class MinuteRow:
    """Exact counts of one (model, version, variant, minute). `errors` counts every failed request;
    `client_errors` the part of them that failed through the caller's fault (malformed, or not fitting the model's
    signature) and `shed` the part shed by admission control (the node was busy: the model never saw them), so
    `errors - client_errors - shed` is what the model and the node failed, of the `requests - client_errors - shed`
    they took on."""

    model: str
    version: str
    variant: str
    minute: int
    requests: int = 0
    errors: int = 0
    items: int = 0
    latency_sum_us: int = 0
    queue_sum_us: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    client_errors: int = 0
    shed: int = 0

    def add(self, other: MinuteRow) -> None:
        add_counts(self, other)

    def count(self, latency_us: int, queue_us: int, items: int) -> None:
        """Count one request that took `latency_us` (`queue_us` of it queued) for `items` rows; its error, if it
        failed, is the caller's to count."""
        self.requests += 1
        self.items += items
        self.latency_sum_us += latency_us
        self.queue_sum_us += queue_us
        self.latency[bucket_of(latency_us)] += 1

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.model, self.version, self.variant, self.minute)


@dataclass(frozen=True)
class EventRow:
    """One kept request."""

    ts: float
    model: str
    version: str
    variant: str
    latency_us: int
    queue_us: int
    batch: int
    status: str
    tier: str
    priority: int
    summary: str  # compact JSON: input shape and mean


@dataclass
class DriftRow:
    """Bin counts of one tensor of one (model, version) in one minute."""

    model: str
    version: str
    minute: int
    tensor: str
    counts: list[int]

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.model, self.version, self.minute, self.tensor)


@dataclass
class TelemetryBatch:
    """What one upload carries. `dropped` counts what the node's buffer had to discard, by kind."""

    node_id: str
    seq: int
    created: float
    minutes: list[MinuteRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
    drift: list[DriftRow] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)


class _Strings:
    """Dictionary encoding of the repeated strings (model names, versions, variants, statuses)."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, value: str) -> int:
        index = self._index.get(value)
        if index is None:
            index = self._index[value] = len(self.table)
            self.table.append(value)
        return index


def _deltas(values: Iterable[int]) -> list[int]:
    out, previous = [], 0
    for value in values:
        out.append(value - previous)
        previous = value
    return out


def _undeltas(values: Iterable[int]) -> list[int]:
    out, total = [], 0
    for value in values:
        total += value
        out.append(total)
    return out


def encode_batch(batch: TelemetryBatch, level: int = 9) -> bytes:
    """A batch as columnar JSON (dictionary-encoded strings, delta-encoded times), zstd-compressed."""
    import zstandard

    strings = _Strings()
    minutes = sorted(batch.minutes, key=lambda m: (m.minute, m.model, m.version, m.variant))
    events = sorted(batch.events, key=lambda e: e.ts)
    drift = sorted(batch.drift, key=lambda d: (d.minute, d.model, d.version, d.tensor))
    document = {
        "format": BATCH_FORMAT,
        "node": batch.node_id,
        "seq": batch.seq,
        "created": round(batch.created, 3),
        "dropped": batch.dropped,
        "minutes": {
            "minute": _deltas(m.minute for m in minutes),
            "model": [strings(m.model) for m in minutes],
            "version": [strings(m.version) for m in minutes],
            "variant": [strings(m.variant) for m in minutes],
            "requests": [m.requests for m in minutes],
            "errors": [m.errors for m in minutes],
            "client_errors": [m.client_errors for m in minutes],
            "shed": [m.shed for m in minutes],
            "items": [m.items for m in minutes],
            "latency_sum_us": [m.latency_sum_us for m in minutes],
            "queue_sum_us": [m.queue_sum_us for m in minutes],
            "latency": [m.latency for m in minutes],
        },
        "events": {
            "ts_ms": _deltas(round(e.ts * 1000) for e in events),
            "model": [strings(e.model) for e in events],
            "version": [strings(e.version) for e in events],
            "variant": [strings(e.variant) for e in events],
            "latency_us": [e.latency_us for e in events],
            "queue_us": [e.queue_us for e in events],
            "batch": [e.batch for e in events],
            "status": [strings(e.status) for e in events],
            "tier": [strings(e.tier) for e in events],
            "priority": [e.priority for e in events],
            "summary": [strings(e.summary) for e in events],
        },
        "drift": {
            "minute": _deltas(d.minute for d in drift),
            "model": [strings(d.model) for d in drift],
            "version": [strings(d.version) for d in drift],
            "tensor": [strings(d.tensor) for d in drift],
            "counts": [d.counts for d in drift],
        },
        "strings": strings.table,
    }
    raw = json.dumps(document, separators=(",", ":")).encode()
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


def _column(table: Mapping[str, Any], key: str, length: int | None) -> list[Any]:
    value = table.get(key)
    if not isinstance(value, list) or (length is not None and len(value) != length):
        raise TelemetryError(f"batch column {key!r} is missing or has the wrong length")
    return value


def _rows(table: Mapping[str, Any], key: str, most: int, what: str) -> int:
    """How many rows a batch's table has (the length of its column `key`), at most `most`.

    Raises:
        TelemetryError: the column is missing, or the table has more rows than a batch may.
    """
    rows = len(_column(table, key, None))
    if rows > most:
        raise TelemetryError(f"telemetry batch is malformed: {rows} {what}, more than the {most} a batch may hold")
    return rows


def _drift_counts(counts: Any) -> list[int]:
    """A drift row's counts: a list of at most DRIFT_BINS counts (a reference has no more bins).

    Raises:
        TelemetryError: anything else.
    """
    if not isinstance(counts, list) or len(counts) > DRIFT_BINS:
        raise TelemetryError(f"telemetry batch is malformed: drift counts must be a list of at most {DRIFT_BINS}")
    return [_count("drift counts", c) for c in counts]


def _count(column: str, value: Any, most: int = MAX_COUNT) -> int:
    """A count (or minute, event time in ms, or sequence number) as the batch claims it: an int (not a bool, a float
    or a string) in 0..`most`, which the control plane's columns hold.

    Raises:
        TelemetryError: it is anything else.
    """
    if type(value) is not int or not 0 <= value <= most:
        raise TelemetryError(f"telemetry batch is malformed: {column}: a count must be a whole number between 0 and"
                             f" {most}, got {value!r:.40}")  # fmt: skip
    return value


def _dropped_kind(key: Any) -> str:
    """A kind of dropped telemetry as the batch names it: one of DROPPED_KINDS.

    Raises:
        TelemetryError: it is anything else.
    """
    if key not in DROPPED_KINDS:
        raise TelemetryError(
            f"telemetry batch is malformed: dropped: {key!r:.40} is not one of {', '.join(DROPPED_KINDS)}"
        )
    return str(key)


def decode_batch(payload: bytes) -> TelemetryBatch:
    """Parse a batch made by `encode_batch`, refusing anything malformed or larger than MAX_BATCH_BYTES.

    Raises:
        TelemetryError: not zstd, too large (declared or inflated), more values or lists than a batch holds
            (MAX_BATCH_COMMAS, MAX_BATCH_BRACKETS: counted before parsing), not the format, more rows of a kind than
            a batch holds (MAX_BATCH_EVENTS, MAX_BATCH_MINUTES, DRIFT_ROWS_TAKEN), columns that do not line up, a
            count that is not an int in 0..MAX_COUNT, a dropped kind not in DROPPED_KINDS (each fits
            MAX_DROPPED_KIND), a text longer than its column (MAX_NAME, MAX_STATUS, MAX_TIER, MAX_TENSOR), rows whose
            texts add up to more than MAX_BATCH_TEXT characters (a text is sent once and named by index), or counts
            that do not add up (more errors than requests, more client errors and shed requests than errors).
    """
    import zstandard

    try:
        # A frame that declares its size is decompressed to that size whatever `max_output_size` says (it
        # bounds only frames that do not): the declared size is checked first.
        declared = zstandard.frame_content_size(payload)
        if declared > MAX_BATCH_BYTES:
            raise TelemetryError(f"telemetry batch declares {declared} bytes, more than {MAX_BATCH_BYTES} decompressed")
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=MAX_BATCH_BYTES)
        commas, brackets = raw.count(b","), raw.count(b"[") + raw.count(b"{")
        if commas > MAX_BATCH_COMMAS or brackets > MAX_BATCH_BRACKETS:
            raise TelemetryError(
                f"telemetry batch has {commas} values and {brackets} lists or objects, more than a batch holds"
                f" ({MAX_BATCH_COMMAS}, {MAX_BATCH_BRACKETS})"
            )
        document = json.loads(raw)
    except (zstandard.ZstdError, ValueError, RecursionError) as exc:
        raise TelemetryError(f"telemetry batch does not decode: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != BATCH_FORMAT:
        raise TelemetryError(f"telemetry batch is not {BATCH_FORMAT}")
    try:
        strings = document["strings"]
        if not isinstance(strings, list):
            raise TelemetryError("telemetry batch is malformed: its strings are not a list")
        # Texts are dictionary-encoded: one long summary named by every event would be stored once per event, so
        # what the rows' texts add up to is held to MAX_BATCH_TEXT.
        expanded = [0]

        def text(index: Any, most: int | None = MAX_NAME) -> str:
            value = strings[int(index)]
            if type(value) is not str:
                raise TelemetryError(f"telemetry batch is malformed: string {int(index)} is not a text")
            if most is not None and len(value) > most:
                raise TelemetryError(
                    f"telemetry batch is malformed: a text of {len(value)} characters where at most {most} fit:"
                    f" {value[:40]!r}"
                )
            expanded[0] += len(value)
            if expanded[0] > MAX_BATCH_TEXT:
                raise TelemetryError(
                    f"telemetry batch is malformed: its rows' texts add up to more than {MAX_BATCH_TEXT} characters"
                )
            return value

        m, e, d = document["minutes"], document["events"], document["drift"]
        n = _rows(m, "requests", MAX_BATCH_MINUTES, "minute rows")
        # a node from before `client_errors` (or `shed`) sends no such column: none of its errors are told apart
        client_errors = _column(m, "client_errors", n) if "client_errors" in m else [0] * n
        shed = _column(m, "shed", n) if "shed" in m else [0] * n
        minutes = [
            MinuteRow(
                model=text(model), version=text(version), variant=text(variant), minute=_count("minute", minute),
                requests=_count("requests", requests), errors=_count("errors", errors),
                items=_count("items", items), latency_sum_us=_count("latency_sum_us", lat_sum),
                queue_sum_us=_count("queue_sum_us", queue_sum), latency=[_count("latency", c) for c in hist],
                client_errors=_count("client_errors", client), shed=_count("shed", busy),
            )
            for model, version, variant, minute, requests, errors, client, busy, items, lat_sum, queue_sum, hist in zip(
                _column(m, "model", n), _column(m, "version", n), _column(m, "variant", n),
                _undeltas(_column(m, "minute", n)), _column(m, "requests", n), _column(m, "errors", n),
                client_errors, shed, _column(m, "items", n), _column(m, "latency_sum_us", n),
                _column(m, "queue_sum_us", n), _column(m, "latency", n), strict=True,
            )
        ]  # fmt: skip
        k = _rows(e, "latency_us", MAX_BATCH_EVENTS, "events")
        events = [
            EventRow(
                ts=_count("ts_ms", ts) / 1000, model=text(model), version=text(version), variant=text(variant),
                latency_us=_count("latency_us", latency), queue_us=_count("queue_us", queue),
                batch=_count("batch", size, INT32_MAX), status=text(status, MAX_STATUS),
                tier=text(tier, MAX_TIER), priority=_count("priority", priority, INT32_MAX),
                summary=text(summary, None),
            )
            for ts, model, version, variant, latency, queue, size, status, tier, priority, summary in zip(
                _undeltas(_column(e, "ts_ms", k)), _column(e, "model", k), _column(e, "version", k),
                _column(e, "variant", k), _column(e, "latency_us", k), _column(e, "queue_us", k),
                _column(e, "batch", k), _column(e, "status", k), _column(e, "tier", k), _column(e, "priority", k),
                _column(e, "summary", k), strict=True,
            )
        ]  # fmt: skip
        j = _rows(d, "counts", DRIFT_ROWS_TAKEN, "drift rows")
        drift = [
            DriftRow(model=text(model), version=text(version), minute=_count("minute", minute),
                     tensor=text(tensor, MAX_TENSOR), counts=_drift_counts(counts))
            for minute, model, version, tensor, counts in zip(
                _undeltas(_column(d, "minute", j)), _column(d, "model", j), _column(d, "version", j),
                _column(d, "tensor", j), _column(d, "counts", j), strict=True,
            )
        ]  # fmt: skip
        dropped = {
            _dropped_kind(key): _count("dropped", value) for key, value in dict(document.get("dropped") or {}).items()
        }
        batch = TelemetryBatch(
            node_id=str(document["node"]), seq=_count("seq", document["seq"]), created=float(document["created"]),
            minutes=minutes, events=events, drift=drift, dropped=dropped,
        )  # fmt: skip
    # OverflowError: int(Infinity); AttributeError: a table that is not a mapping
    except (KeyError, IndexError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise TelemetryError(f"telemetry batch is malformed: {exc}") from exc
    for row in batch.minutes:
        if len(row.latency) != BUCKETS or row.requests < 0 or row.errors < 0 or row.errors > row.requests:
            raise TelemetryError(f"minute row {row.key} is inconsistent")
        if not 0 <= row.client_errors <= row.errors:
            raise TelemetryError(
                f"minute row {row.key} is inconsistent: client_errors {row.client_errors} must be between 0 and its"
                f" errors ({row.errors}), of which they are a part"
            )
        if not 0 <= row.shed <= row.errors - row.client_errors:
            raise TelemetryError(
                f"minute row {row.key} is inconsistent: shed {row.shed} must be between 0 and its errors that were"
                f" not the caller's fault ({row.errors - row.client_errors}), of which they are a part"
            )
    if batch.seq < 1:
        raise TelemetryError("batch sequence numbers start at 1")
    return batch
