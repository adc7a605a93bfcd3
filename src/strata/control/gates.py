"""Rollout gates: what a wave must show before the next one starts, as pure functions over a wave's population.

A gate is `metric OP threshold` (`p95_latency_ratio<=1.5`). The metrics compare the nodes that run the new version
(the canary: every released node on it) with the nodes still on the version they had (the baseline):

    activation_success_rate  of the wave's nodes that tried, the share that activated the version and passed
                             the node's probation (load failures, golden-check failures and probation rollbacks
                             count against it; nodes a policy keeps out do not count at all)
    error_rate               inference errors / requests over the canary nodes
    error_rate_delta         the canary's error rate minus the baseline's
    p95_latency_ratio        the canary's p95 compute latency over the baseline's, per hardware profile (medians of
                             the nodes' p95s), the worst profile counting; nodes with fewer than `min_requests`
                             requests are left out

    drift_psi                the largest population stability index of any canary node's inputs or outputs against
                             the version's build-time reference (from node telemetry, since the wave started)

When the baseline is gone (the last wave) the figures recorded at the previous evaluation stand in for it. A
metric without data (no traffic yet, or a package built without sample data) passes and says so.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from strata.core.errors import ConfigError
from strata.core.wire import ServingCounters

OPERATORS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">=": lambda value, limit: value >= limit,
    "<=": lambda value, limit: value <= limit,
    ">": lambda value, limit: value > limit,
    "<": lambda value, limit: value < limit,
}

_GATE_RE = re.compile(r"^\s*([a-z0-9_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Gate:
    """`metric op threshold`: the metric's value must satisfy the comparison."""

    metric: str
    op: str
    threshold: float

    @property
    def text(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def holds(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Gate:
        """Raises:
        ConfigError: not a gate this version knows.
        """
        return parse_gate(f"{raw['metric']}{raw['op']}{raw['threshold']}")


DEFAULT_GATES: Final = (
    Gate("activation_success_rate", ">=", 0.95),
    Gate("error_rate_delta", "<=", 0.01),
    Gate("p95_latency_ratio", "<=", 1.5),
    Gate("drift_psi", "<=", 0.25),
)


def parse_gate(text: str) -> Gate:
    """`p95_latency_ratio<=1.5` -> Gate.

    Raises:
        ConfigError: not `metric OP number`, or an unknown metric.
    """
    match = _GATE_RE.match(text)
    if match is None:
        raise ConfigError(f"gate {text!r} is not METRIC OP NUMBER (OP one of >=, <=, >, <)")
    metric, op, number = match.groups()
    if metric not in METRICS:
        raise ConfigError(f"gate {text!r}: unknown metric {metric!r}; known: {sorted(METRICS)}")
    try:
        threshold = float(number)
    except ValueError:
        raise ConfigError(f"gate {text!r}: {number!r} is not a number") from None
    if not math.isfinite(threshold):
        raise ConfigError(f"gate {text!r}: the threshold must be finite")
    return Gate(metric, op, threshold)


def merge_gates(given: Iterable[Gate], defaults: Iterable[Gate] = DEFAULT_GATES) -> tuple[Gate, ...]:
    """The defaults, with each given gate replacing the default on the same metric (and added if none)."""
    given = list(given)
    overridden = {g.metric for g in given}
    return tuple([d for d in defaults if d.metric not in overridden] + given)


# --- populations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingSample:
    """One node's serving figures on the version it runs, with its hardware profile."""

    profile: str
    counters: ServingCounters


@dataclass(frozen=True)
class Baseline:
    """What the nodes on the previous version showed: kept with the rollout, for when none are left."""

    error_rate: float | None = None
    p95_by_profile: Mapping[str, float] = field(default_factory=dict)
    nodes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"error_rate": self.error_rate, "p95_by_profile": dict(self.p95_by_profile), "nodes": self.nodes}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> Baseline:
        if not raw:
            return cls()
        rate = raw.get("error_rate")
        return cls(
            error_rate=None if rate is None else float(rate),
            p95_by_profile={str(k): float(v) for k, v in (raw.get("p95_by_profile") or {}).items()},
            nodes=int(raw.get("nodes", 0)),
        )


@dataclass(frozen=True)
class Population:
    """A wave's evidence: how its nodes' activations went, and how canary and baseline nodes serve."""

    wave_members: int
    activated: int
    failed: int
    canary: tuple[ServingSample, ...]
    baseline: tuple[ServingSample, ...]
    recorded_baseline: Baseline = field(default_factory=Baseline)
    min_requests: int = 20
    canary_drift: tuple[float, ...] = ()

    def usable(self, samples: Iterable[ServingSample]) -> list[ServingSample]:
        return [s for s in samples if s.counters.requests >= self.min_requests]


def summarize_baseline(population: Population) -> Baseline:
    """The live baseline's figures, or the recorded ones when no baseline node has enough traffic."""
    usable = population.usable(population.baseline)
    if not usable:
        return population.recorded_baseline
    return Baseline(
        error_rate=_pooled_error_rate(usable),
        p95_by_profile=_p95_by_profile(usable),
        nodes=len(usable),
    )


def _pooled_error_rate(samples: list[ServingSample]) -> float | None:
    requests = sum(s.counters.requests for s in samples)
    return sum(s.counters.errors for s in samples) / requests if requests else None


def _p95_by_profile(samples: list[ServingSample]) -> dict[str, float]:
    by_profile: dict[str, list[float]] = {}
    for sample in samples:
        if sample.counters.latency_p95_ms is not None:
            by_profile.setdefault(sample.profile, []).append(sample.counters.latency_p95_ms)
    return {profile: statistics.median(values) for profile, values in sorted(by_profile.items())}


# --- metrics --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """A metric's value (None: no data yet) and the numbers behind it, in words."""

    value: float | None
    detail: str


def activation_success_rate(population: Population) -> Measure:
    tried = population.activated + population.failed
    if not tried:
        return Measure(None, f"none of the wave's {population.wave_members} nodes has tried the version yet")
    return Measure(
        population.activated / tried,
        f"{population.activated} of {tried} nodes that tried activated it "
        f"({population.failed} failed; wave of {population.wave_members})",
    )


def error_rate(population: Population) -> Measure:
    usable = population.usable(population.canary)
    rate = _pooled_error_rate(usable)
    if rate is None:
        return Measure(None, f"no canary node has served {population.min_requests} requests yet")
    requests = sum(s.counters.requests for s in usable)
    errors = sum(s.counters.errors for s in usable)
    return Measure(rate, f"{errors} errors in {requests} requests on {len(usable)} canary nodes")


def error_rate_delta(population: Population) -> Measure:
    canary = error_rate(population)
    if canary.value is None:
        return canary
    baseline = summarize_baseline(population)
    base = baseline.error_rate if baseline.error_rate is not None else 0.0
    source = f"{baseline.nodes} baseline nodes" if baseline.error_rate is not None else "no baseline traffic"
    return Measure(canary.value - base, f"canary {canary.value:.4f} vs baseline {base:.4f} ({source})")


def p95_latency_ratio(population: Population) -> Measure:
    canary = _p95_by_profile(population.usable(population.canary))
    if not canary:
        return Measure(None, f"no canary node has served {population.min_requests} requests yet")
    baseline = summarize_baseline(population).p95_by_profile
    shared = [p for p in canary if p in baseline and baseline[p] > 0]
    if shared:
        ratios = {p: canary[p] / baseline[p] for p in shared}
        worst = max(ratios, key=lambda p: ratios[p])
        return Measure(
            ratios[worst],
            f"{worst}: canary p95 {canary[worst]:.3g} ms vs baseline {baseline[worst]:.3g} ms "
            f"(profiles compared: {len(shared)})",
        )
    if not baseline:
        return Measure(None, "no baseline node has served enough requests to compare with")
    canary_all = statistics.median(canary.values())
    base_all = statistics.median(baseline.values())
    if base_all <= 0:
        return Measure(None, "the baseline's p95 is zero")
    return Measure(
        canary_all / base_all,
        f"no profile on both sides; canary p95 {canary_all:.3g} ms vs baseline {base_all:.3g} ms overall",
    )


def drift_psi(population: Population) -> Measure:
    if not population.canary_drift:
        return Measure(None, "no canary node has reported enough drift statistics against a reference yet")
    worst = max(population.canary_drift)
    return Measure(worst, f"largest PSI {worst:.3f} over {len(population.canary_drift)} canary nodes")


METRICS: Final[dict[str, Callable[[Population], Measure]]] = {
    "activation_success_rate": activation_success_rate,
    "error_rate": error_rate,
    "error_rate_delta": error_rate_delta,
    "p95_latency_ratio": p95_latency_ratio,
    "drift_psi": drift_psi,
}


# --- evaluation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome at one evaluation: the numbers, and whether they pass."""

    gate: Gate
    wave: int
    value: float | None
    passed: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate.text,
            "metric": self.gate.metric,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "wave": self.wave,
            "value": self.value,
            "passed": self.passed,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GateResult:
        value = raw.get("value")
        return cls(
            gate=Gate(str(raw["metric"]), str(raw["op"]), float(raw["threshold"])),
            wave=int(raw["wave"]),
            value=None if value is None else float(value),
            passed=bool(raw["passed"]),
            detail=str(raw.get("detail", "")),
        )


def evaluate_gates(gates: Iterable[Gate], population: Population, wave: int) -> list[GateResult]:
    """Every gate on the wave's evidence; a metric without data passes, and its detail says so."""
    results = []
    for gate in gates:
        measure = METRICS[gate.metric](population)
        passed = measure.value is None or gate.holds(measure.value)
        detail = measure.detail if measure.value is not None else f"no data: {measure.detail}"
        results.append(GateResult(gate, wave, measure.value, passed, detail))
    return results


def doomed(gates: Iterable[Gate], population: Population, wave: int) -> GateResult | None:
    """A gate the wave can no longer pass whatever its remaining nodes do, so the rollout may stop at once.

    Only the activation success rate can be known early: if every node still to try succeeded and the rate would
    still miss the threshold, waiting longer would only put the version on more nodes.
    """
    for gate in gates:
        if gate.metric != "activation_success_rate" or gate.op not in (">=", ">"):
            continue
        members = population.wave_members
        if not members or not population.failed:
            continue
        best = (members - population.failed) / members
        if not gate.holds(best):
            measure = activation_success_rate(population)
            return GateResult(
                gate,
                wave,
                measure.value,
                False,
                f"{measure.detail}; even if every remaining node succeeded the rate would be {best:.3f}",
            )
    return None
