"""How each model version has served on this node since it was activated: requests, errors, recent latency.

The inference server feeds it (through `InferenceMetrics`); the reconciler reads it for the status report
(`ModelStatus.serving`) and for the probation after an activation. Counters are per (model, version) and are
reset when that version is activated, so they always describe the current activation. Latency is the model's own
compute time (on the CPU runtime the CPU time of the run, so that other load on the node does not make a model
look slow; see `oip_server`) of the last `window` successful requests, kept in a bounded deque (a few KB a model),
from which the 95th percentile is taken when asked.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from strata.core.wire import ServingCounters

DEFAULT_WINDOW = 512

# Whose fault a failed request was, by its status (`oip_server._failure_reason`, `metrics.FAILURE_REASONS`):
#   bad_request  the caller's: malformed, or does not fit the model's signature (answered 400)
#   rejected     the node's: shed by admission control, the node was busy (503; the model never saw it)
#   unavailable  the node's: stopping, or its workers are gone (503)
#   internal     the model's or the node's: the runtime failed (500)
# Telemetry counts the caller's apart (`MinuteRow.client_errors`), so that an operator can tell clients that send
# garbage from a model or node that fails, and the shed ones apart too (`MinuteRow.shed`): load shedding shows
# without being taken for the model failing.
CLIENT_FAULTS = frozenset({"bad_request"})
SHED = "rejected"
# Failures that do not count against the model: the caller's, and a request shed by admission control. They are
# left out of these counters altogether (neither a request nor an error): probation and rollout gates judge the
# model on the requests it took on, and so does the telemetry's `error_rate`.
NOT_THE_MODELS_FAULT = CLIENT_FAULTS | {SHED}


def is_client_fault(status: str) -> bool:
    """Whether a request that ended with `status` failed through its caller's fault (see `CLIENT_FAULTS`)."""
    return status in CLIENT_FAULTS


def is_shed(status: str) -> bool:
    """Whether a request that ended with `status` was shed by admission control (the node was busy)."""
    return status == SHED


def percentile(values: Iterable[float], fraction: float) -> float | None:
    """The nearest-rank percentile (`fraction` in 0..1) of `values`; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class _Window:
    since: float
    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=deque)


Counted = _Window | None
"""What a series had counted before `ServingTracker.reset` (None: nothing), for `restore`."""


class ServingTracker:
    """Serving counters per (model, version). Thread-safe: the event loop and executor threads record, the
    agent's loop thread reads."""

    def __init__(self, window: int = DEFAULT_WINDOW, clock: Callable[[], float] = time.time) -> None:
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str], _Window] = {}

    def _get(self, model: str, version: str) -> _Window:
        key = (model, version)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Window(since=self._clock(), latencies_ms=deque(maxlen=self._window))
        return series

    def record_success(self, model: str, version: str, latency_ms: float) -> None:
        """One request served, its model compute taking `latency_ms`."""
        self.record_successes(model, version, (latency_ms,))

    def record_successes(self, model: str, version: str, latencies_ms: Sequence[float]) -> None:
        """Requests served, their model compute taking `latencies_ms` each."""
        with self._lock:
            series = self._get(model, version)
            series.requests += len(latencies_ms)
            series.latencies_ms.extend(latencies_ms)

    def record_failure(self, model: str, version: str, reason: str) -> None:
        """One request failed; failures that are not the model's (`NOT_THE_MODELS_FAULT`) are not counted at all."""
        if reason in NOT_THE_MODELS_FAULT:
            return
        with self._lock:
            series = self._get(model, version)
            series.requests += 1
            series.errors += 1

    def take(self) -> list[tuple[str, str, int, int, list[float]]]:
        """Every series' counts since the last `take`, as (model, version, requests, errors, latencies_ms), and
        start afresh: what a serving process hands to the agent's tracker (`add`)."""
        with self._lock:
            series, self._series = self._series, {}
        return [(m, v, w.requests, w.errors, list(w.latencies_ms)) for (m, v), w in series.items() if w.requests]

    def add(self, model: str, version: str, requests: int, errors: int, latencies_ms: Iterable[float]) -> None:
        """Count what another serving process took (`take`) as this one's own."""
        with self._lock:
            series = self._get(model, version)
            series.requests += requests
            series.errors += errors
            series.latencies_ms.extend(latencies_ms)

    def reset(self, model: str, version: str, now: float) -> Counted:
        """Start counting `version` afresh (it has just been activated); return what was counted before, for
        `restore` (an activation that does not happen after all: the new package may share the version string)."""
        with self._lock:
            replaced = self._series.get((model, version))
            self._series[(model, version)] = _Window(since=now, latencies_ms=deque(maxlen=self._window))
        return replaced

    def restore(self, model: str, version: str, counted: Counted) -> None:
        """Put back what `reset` returned, with what was counted since (the package still served under that
        version: its requests, not the one that was not activated)."""
        if counted is None:  # nothing before: what was counted since stays as it is
            return
        with self._lock:
            since = self._series.get((model, version))
            if since is not None:
                counted.requests += since.requests
                counted.errors += since.errors
                counted.latencies_ms.extend(since.latencies_ms)
            self._series[(model, version)] = counted

    def forget(self, model: str, keep_version: str | None = None) -> None:
        """Drop the series of `model`'s other versions (after a switch, only the active one matters)."""
        with self._lock:
            for key in [k for k in self._series if k[0] == model and k[1] != keep_version]:
                del self._series[key]

    def counters(self, model: str, version: str) -> ServingCounters | None:
        """The counters of one model version, None when it has served nothing since counting began."""
        with self._lock:
            series = self._series.get((model, version))
            if series is None:
                return None
            latencies = list(series.latencies_ms)
            requests, errors, since = series.requests, series.errors, series.since
        p95 = percentile(latencies, 0.95)
        return ServingCounters(
            requests=requests,
            errors=errors,
            latency_p95_ms=None if p95 is None else round(p95, 4),
            since=since,
        )

    def samples(self, model: str, version: str) -> int:
        """How many latency samples one series holds now."""
        with self._lock:
            series = self._series.get((model, version))
            return len(series.latencies_ms) if series else 0
