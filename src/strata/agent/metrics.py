"""Prometheus metrics of the node's inference server, rendered in the text exposition format 0.0.4.

Hand-written on purpose: the agent must stay under 70 MB resident with a model loaded, and python + numpy +
onnxruntime + one small session already take ~56 MB (asyncio/ssl another 7 MB). prometheus_client would add
~3.4 MB because it imports http.server, wsgiref, urllib.request and email; what a node needs is counters,
gauges and histograms with labels, thread-safe, rendered as text, which is what this module is.

`MetricsRegistry` holds metric families; `InferenceMetrics` registers the inference server's own, with
Triton's names where Triton has one (`nv_inference_*`, cumulative microseconds), so dashboards built for
Triton work unchanged. Other parts of the agent add their families to the same registry
(`metrics.registry.gauge(...)`) and they appear on the same `/metrics` page.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from strata import __version__
from strata.agent.serving import ServingTracker

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Request latency buckets in seconds: a small model on a device answers in well under a millisecond, a large
# one on a busy near-edge node in seconds.
LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# A model version the node no longer serves keeps its series this long after its last request (several scrapes).
RETIRED_SERIES_S: Final = 300.0

# rejected: shed by admission control (queue full or wait over its bound), answered 503 with Retry-After.
FAILURE_REASONS: Final = ("bad_request", "unavailable", "internal", "rejected")

_NAME_RE = re.compile(r"\A[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_RE = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")

Labels = tuple[str, ...]
# a family's series as JSON data (see `MetricFamily.snapshot`), and a registry's, by family name
Snapshot = list[list[Any]]
RegistrySnapshot = dict[str, Snapshot]


def format_value(value: float) -> str:
    """A sample value as the exposition format writes it (`+Inf`, `-Inf`, `NaN`; integers without `.0`)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """Escape a label value: backslash, double quote and line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class MetricFamily:
    """A named metric with fixed label names; one sample series per distinct tuple of label values.

    Subclasses keep their series under `_lock` and write them in `_render_samples`.
    """

    kind: str = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        """Raises:
        ValueError: the metric or a label name is not a valid Prometheus name, or a label name is reserved.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in label_names:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for metric {name}")
        self.name = name
        self.help = help_text
        self.label_names: Labels = tuple(label_names)
        self._lock = threading.Lock()

    def _check(self, labels: Labels) -> Labels:
        if len(labels) != len(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {list(self.label_names)}, got {list(labels)}")
        return labels

    def _label_text(self, labels: Labels, extra: str = "") -> str:
        pairs = [f'{key}="{escape_label_value(value)}"' for key, value in zip(self.label_names, labels, strict=True)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def render(self, out: list[str], others: Sequence[Snapshot] = ()) -> None:
        """Append this family's HELP, TYPE and sample lines to `out`, the series of `others` (snapshots of the
        same family in other serving processes) added to this process's own."""
        out.append(f"# HELP {self.name} {_escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        self._render_samples(out, others)

    def _render_samples(self, out: list[str], others: Sequence[Snapshot]) -> None:
        raise NotImplementedError

    def snapshot(self) -> Snapshot:
        """This family's series as plain JSON data: `[[labels, value], ...]` (histograms: `[[labels, counts,
        sum], ...]`), for another process to add to its own (`render(out, others)`)."""
        raise NotImplementedError

    def forget(self, prefix: Labels) -> None:
        """Drop every series whose first label values are `prefix` (a model version the node no longer serves)."""
        raise NotImplementedError


class _ValueFamily(MetricFamily):
    """A family with one value per series (counters and gauges); other processes' values add to its own."""

    def __init__(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, label_names)
        self._values: dict[Labels, float] = {}

    def _render_samples(self, out: list[str], others: Sequence[Snapshot]) -> None:
        with self._lock:
            values = dict(self._values)
        for other in others:
            for labels, value in other:
                key = tuple(labels)
                values[key] = values.get(key, 0) + value
        out.extend(f"{self.name}{self._label_text(labels)} {format_value(value)}" for labels, value in values.items())

    def snapshot(self) -> Snapshot:
        with self._lock:
            return [[list(labels), value] for labels, value in self._values.items()]

    def forget(self, prefix: Labels) -> None:
        with self._lock:
            self._values = {k: v for k, v in self._values.items() if k[: len(prefix)] != prefix}


class Counter(_ValueFamily):
    """A value that only goes up (requests, cumulative microseconds)."""

    kind = "counter"

    def inc(self, *labels: str, by: float = 1) -> None:
        """Add `by` to the series with these label values (created at zero on first use).

        Raises:
            ValueError: wrong number of label values, or a negative `by`.
        """
        if by < 0:
            raise ValueError(f"counter {self.name} cannot go down (by={by})")
        with self._lock:
            values = self._values
            if labels in values:  # a known series: its labels were checked when it was made
                values[labels] += by
            else:
                values[self._check(labels)] = by

    def value(self, *labels: str) -> float:
        """The current value of one series (0 when it was never incremented)."""
        with self._lock:
            return self._values.get(labels, 0)


class Gauge(_ValueFamily):
    """A value that goes up and down, or a set of series replaced as a whole (`replace`)."""

    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        """Set one series.

        Raises:
            ValueError: wrong number of label values.
        """
        key = self._check(labels)
        with self._lock:
            self._values[key] = value

    def replace(self, series: Mapping[Labels, float]) -> None:
        """Replace every series at once (series not in `series` disappear).

        Raises:
            ValueError: a key has the wrong number of label values.
        """
        checked = {self._check(labels): value for labels, value in series.items()}
        with self._lock:
            self._values = checked

    def value(self, *labels: str) -> float | None:
        """The current value of one series, None when it is not set."""
        with self._lock:
            return self._values.get(labels)


class Histogram(MetricFamily):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, label_names: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        """Raises:
        ValueError: as MetricFamily, or buckets that are empty or not strictly increasing.
        """
        super().__init__(name, help_text, label_names)
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"histogram {name} needs strictly increasing buckets, got {list(buckets)}")
        self.buckets: tuple[float, ...] = tuple(bounds)
        # Per series: a count per finite bucket plus one for +Inf (not cumulative), then the sum.
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, *labels: str, value: float) -> None:
        """Record one observation.

        Raises:
            ValueError: wrong number of label values.
        """
        self.observe_many(*labels, values=(value,))

    def observe_many(self, *labels: str, values: Sequence[float]) -> None:
        """Record observations of one series (a batch's requests).

        Raises:
            ValueError: wrong number of label values.
        """
        key = self._check(labels)
        buckets = self.buckets
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = ([0] * (len(buckets) + 1), [0.0])
            counts = series[0]
            for value in values:
                counts[bisect.bisect_left(buckets, value)] += 1  # le is inclusive: value == bound counts there
            series[1][0] += sum(values)

    def count(self, *labels: str) -> int:
        """How many observations one series holds."""
        with self._lock:
            series = self._series.get(labels)
            return sum(series[0]) if series else 0

    def snapshot(self) -> Snapshot:
        with self._lock:
            return [[list(labels), list(counts), total[0]] for labels, (counts, total) in self._series.items()]

    def forget(self, prefix: Labels) -> None:
        with self._lock:
            self._series = {k: v for k, v in self._series.items() if k[: len(prefix)] != prefix}

    def _render_samples(self, out: list[str], others: Sequence[Snapshot]) -> None:
        with self._lock:
            merged = {labels: (list(counts), total[0]) for labels, (counts, total) in self._series.items()}
        for other in others:
            for labels, counts, total in other:
                key = tuple(labels)
                mine = merged.get(key)
                if mine is None:
                    merged[key] = (list(counts), total)
                elif len(counts) == len(mine[0]):
                    merged[key] = ([a + b for a, b in zip(mine[0], counts, strict=True)], mine[1] + total)
        items = [(labels, counts, total) for labels, (counts, total) in merged.items()]
        bounds = [*(format_value(b) for b in self.buckets), "+Inf"]
        for labels, counts, total in items:
            cumulative = 0
            for bound, count in zip(bounds, counts, strict=True):
                cumulative += count
                le = 'le="' + bound + '"'
                out.append(f"{self.name}_bucket{self._label_text(labels, le)} {cumulative}")
            out.append(f"{self.name}_sum{self._label_text(labels)} {format_value(total)}")
            out.append(f"{self.name}_count{self._label_text(labels)} {cumulative}")


class MetricsRegistry:
    """The metric families of one process, rendered together; names are unique."""

    def __init__(self) -> None:
        self._families: dict[str, MetricFamily] = {}
        self._lock = threading.Lock()

    def register(self, family: MetricFamily) -> None:
        """Add a family.

        Raises:
            ValueError: a family of that name is already registered.
        """
        with self._lock:
            if family.name in self._families:
                raise ValueError(f"metric {family.name} is already registered")
            self._families[family.name] = family

    def counter(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Counter:
        """Create and register a counter. Raises: ValueError, as `register` and MetricFamily."""
        family = Counter(name, help_text, label_names)
        self.register(family)
        return family

    def gauge(self, name: str, help_text: str, label_names: Sequence[str] = ()) -> Gauge:
        """Create and register a gauge. Raises: ValueError, as `register` and MetricFamily."""
        family = Gauge(name, help_text, label_names)
        self.register(family)
        return family

    def histogram(
        self, name: str, help_text: str, label_names: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        """Create and register a histogram. Raises: ValueError, as `register` and Histogram."""
        family = Histogram(name, help_text, label_names, buckets)
        self.register(family)
        return family

    def render(self, others: Sequence[RegistrySnapshot] = ()) -> str:
        """Every family in the text exposition format (served as `CONTENT_TYPE`), with the series of `others`
        (snapshots of the registries of the node's other serving processes) added in: one view of the node."""
        with self._lock:
            families = list(self._families.values())
        out: list[str] = []
        for family in families:
            family.render(out, [other[family.name] for other in others if family.name in other])
        out.append("")
        return "\n".join(out)

    def snapshot(self, leave_out: Iterable[str] = ()) -> RegistrySnapshot:
        """Every family's series (but those named in `leave_out`) as JSON data, by family name."""
        skip = set(leave_out)
        with self._lock:
            families = [family for name, family in self._families.items() if name not in skip]
        return {family.name: family.snapshot() for family in families}


class InferenceMetrics:
    """The inference server's metrics, per (model, version), with Triton's names and units.

    Durations are recorded for successful requests only, as Triton does; failures are counted by reason
    (`FAILURE_REASONS`). Only models the node actually serves get series, so a client cannot grow the label
    set by asking for made-up names, and a version it no longer serves loses its series `RETIRED_SERIES_S` after its
    last request (`forget_retired`), so a node that runs for months through many versions does not keep them all.
    With dynamic batching, as in Triton, `nv_inference_exec_count` counts runtime calls (`record_execution`) and
    `nv_inference_count` the rows of the requests (`record_success`), so their ratio is the average batch; each
    request adds its own queue time and its batch's compute time.
    """

    def __init__(
        self,
        registry: MetricsRegistry | None = None,
        agent_version: str = __version__,
        serving: ServingTracker | None = None,
        process: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`serving` also receives every outcome: the per-activation counters the node reports and its
        probation judges (a fresh tracker when not given). `process` names this serving process on a node
        that serves from several (`strata_serving_process_requests` counts each one's requests). `clock` says
        when a version last served (Triton's `last_inference`, and when its series are dropped).

        Raises:
            ValueError: `registry` already holds one of these families.
        """
        self.registry = registry if registry is not None else MetricsRegistry()
        self.serving = serving if serving is not None else ServingTracker()
        model = ("model", "version")
        add = self.registry
        self.request_success = add.counter(
            "nv_inference_request_success", "Number of successful inference requests, all batch sizes", model
        )
        self.request_failure = add.counter(
            "nv_inference_request_failure", "Number of failed inference requests, all batch sizes", (*model, "reason")
        )
        self.inference_count = add.counter(
            "nv_inference_count", "Number of inferences performed (a batch of n counts n)", model
        )
        self.exec_count = add.counter("nv_inference_exec_count", "Number of model executions performed", model)
        self.request_duration_us = add.counter(
            "nv_inference_request_duration_us", "Cumulative inference request duration in microseconds", model
        )
        self.queue_duration_us = add.counter(
            "nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", model
        )
        self.compute_infer_duration_us = add.counter(
            "nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds", model
        )
        self.pending_requests = add.gauge(
            "nv_inference_pending_request_count", "Inference requests waiting in the queue for a worker", model
        )
        self.request_seconds = add.histogram(
            "strata_inference_request_duration_seconds", "Inference request duration of successful requests", model
        )
        self.model_active = add.gauge(
            "strata_model_active", "1 for each model variant this node serves now", ("model", "version", "variant")
        )
        self.agent_info = add.gauge("strata_agent_info", "The strata agent's version", ("version",))
        self.agent_info.set(agent_version, value=1)
        self._last_inference_ms: dict[tuple[str, str], int] = {}  # Triton's statistics say when each model last ran
        self._clock = clock
        self._per_version: tuple[MetricFamily, ...] = (
            self.request_success, self.request_failure, self.inference_count, self.exec_count,
            self.request_duration_us, self.queue_duration_us, self.compute_infer_duration_us, self.request_seconds,
        )  # fmt: skip
        self._process = process or ""
        self.process_requests = (
            add.counter(
                "strata_serving_process_requests", "Inference requests answered by each serving process", ("process",)
            )
            if process is not None
            else None
        )
        if self.process_requests is not None:
            self.process_requests.inc(self._process, by=0)  # the series shows from the start

    def record_success(
        self,
        model: str,
        version: str,
        *,
        batch: int,
        request_ns: int,
        queue_ns: int,
        compute_ns: int,
        model_ns: int | None = None,
    ) -> None:
        """Count one successful request of `batch` inferences, with its durations (its execution is counted by
        `record_execution`, once per runtime call however many requests shared it).

        `model_ns` is what the serving counters (and so probation and rollout gates) take as the model's latency:
        a measure of the model's own cost that a busy node does not inflate (see `oip_server`); the wall-clock
        `compute_ns` when not given. The Prometheus durations are wall-clock, as Triton's are.
        """
        self.record_successes(model, version, [(batch, request_ns, queue_ns, compute_ns, model_ns)])

    def record_successes(
        self, model: str, version: str, answered: Sequence[tuple[int, int, int, int, int | None]]
    ) -> None:
        """`record_success` for several requests of one model version (a batch's) at once: each series is added to
        once. `answered` holds each request's (batch, request_ns, queue_ns, compute_ns, model_ns)."""
        count = len(answered)
        self.request_success.inc(model, version, by=count)
        if self.process_requests is not None:
            self.process_requests.inc(self._process, by=count)
        self.inference_count.inc(model, version, by=sum(a[0] for a in answered))
        self.request_duration_us.inc(model, version, by=sum(a[1] // 1000 for a in answered))
        self.queue_duration_us.inc(model, version, by=sum(a[2] // 1000 for a in answered))
        self.compute_infer_duration_us.inc(model, version, by=sum(a[3] // 1000 for a in answered))
        self.request_seconds.observe_many(model, version, values=[a[1] / 1e9 for a in answered])
        self._last_inference_ms[(model, version)] = int(self._clock() * 1000)
        self.serving.record_successes(model, version, [(a[3] if a[4] is None else a[4]) / 1e6 for a in answered])

    def record_execution(self, model: str, version: str, count: int = 1) -> None:
        """Count `count` runtime calls of a model."""
        self.exec_count.inc(model, version, by=count)

    def record_failure(self, model: str, version: str, reason: str) -> None:
        """Count one failed request.

        Raises:
            ValueError: `reason` is not one of FAILURE_REASONS.
        """
        if reason not in FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}; use one of {FAILURE_REASONS}")
        self.request_failure.inc(model, version, reason)
        self._last_inference_ms[(model, version)] = int(self._clock() * 1000)
        if self.process_requests is not None:
            self.process_requests.inc(self._process)
        self.serving.record_failure(model, version, reason)

    def triton_statistics(self, model: str, version: str) -> dict[str, object]:
        """One model version's counters as Triton's statistics extension reports them (JSON form of
        `inference.ModelStatistics`): counts, and cumulative durations in nanoseconds (kept in microseconds here).
        Failed requests have a count and no duration; input and output handling are part of `compute_infer`."""
        successes = int(self.request_success.value(model, version))

        def duration(count: int, us: float = 0) -> dict[str, int]:
            return {"count": count, "ns": int(us) * 1000}

        return {
            "name": model,
            "version": version,
            "last_inference": self._last_inference_ms.get((model, version), 0),
            "inference_count": int(self.inference_count.value(model, version)),
            "execution_count": int(self.exec_count.value(model, version)),
            "inference_stats": {
                "success": duration(successes, self.request_duration_us.value(model, version)),
                "fail": duration(sum(int(self.request_failure.value(model, version, r)) for r in FAILURE_REASONS)),
                "queue": duration(successes, self.queue_duration_us.value(model, version)),
                "compute_input": duration(0),
                "compute_infer": duration(successes, self.compute_infer_duration_us.value(model, version)),
                "compute_output": duration(0),
            },
        }

    def forget_retired(self, served: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Drop the series of every (model, version) not in `served` whose last request is `RETIRED_SERIES_S` old:
        a scraper has seen its final counts by then. Returns the versions dropped."""
        keep = set(served)
        horizon_ms = int((self._clock() - RETIRED_SERIES_S) * 1000)
        retired = [key for key, last in list(self._last_inference_ms.items()) if key not in keep and last < horizon_ms]
        for key in retired:
            for family in self._per_version:
                family.forget(key)
            del self._last_inference_ms[key]
        return retired

    def set_active_models(self, active: Iterable[tuple[str, str, str]]) -> None:
        """Say which (model, version, variant) the node serves now; the others' gauges disappear."""
        self.model_active.replace(dict.fromkeys(active, 1))

    def render(self, others: Sequence[RegistrySnapshot] = ()) -> str:
        """The whole registry in the text exposition format, with the other serving processes' `others` added."""
        return self.registry.render(others)
