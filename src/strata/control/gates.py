"""Rollout gates: what a wave must show before the next one starts, as pure functions over a wave's population.

A gate is `metric OP threshold` (`p95_latency_ratio<=1.5`). The metrics compare the nodes that run the new version
(the canary: every released node on it) with the nodes still on the version they had (the baseline):

    activation_success_rate  of the wave's nodes that tried, the share that activated the version and passed
                             the node's probation (load failures, golden-check failures and probation rollbacks
                             count against it; nodes a policy keeps out do not count at all); the same share
                             over every wave so far counts too, the lower of the two: a node of an earlier wave
                             that fails after its wave passed (a probation rollback) still counts against it
    error_rate               inference errors / requests over the canary nodes, as the nodes' serving counters
                             count them: the requests a node took on (neither malformed nor shed by admission
                             control) and those of them the model or the node failed; the telemetry API's
                             `error_rate` over the same requests (its `shed_rate` shows the shedding). The
                             counters are each node's claim, so no node weighs more than the median node, and
                             with two nodes or more the one most in the version's favour is left out (see
                             `robust_error_rate`): one node cannot pass a failing version
    error_rate_delta         the canary's error rate minus the baseline's (the baseline's pooled the same way, the
                             node that raises it most left out)
    p95_latency_ratio        the canary's p95 compute latency over the baseline's, per hardware profile (medians of
                             the nodes' p95s), the worst profile counting; nodes with fewer than `min_requests`
                             requests are left out

    drift_psi                the largest population stability index of any canary node's inputs or outputs against
                             the version's build-time reference (from node telemetry, since the wave started);
                             nodes with fewer than `min_drift_requests` requests in that window are left out

When the baseline is gone (the last wave) the figures recorded at the previous evaluation stand in for it.

A gate judges only on enough data. Without it (no canary node has served enough requests yet) its verdict is
`no_data`, and the no-data policy decides, per rollout or per gate (`drift_psi<=0.25 on-no-data=pass`):
`hold` (the default) keeps the wave waiting for data until its deadline and then fails the gate for want of data;
`pass` lets the wave go on, the result saying plainly that it was not judged; `fail` fails it at once. A gate
that cannot apply (drift on a package built without sample data, latency when no node is left on an earlier
version and none was recorded) passes as `not_applicable`, and says why.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from strata.core.comparison import ORDERING, compare, parse_comparison
from strata.core.errors import ConfigError
from strata.core.wire import ServingCounters
from strata.core.words import plural

NO_DATA_POLICIES: Final = ("hold", "pass", "fail")
"""What a gate without enough data does: wait for data until the wave's deadline, pass (saying so), or fail."""

# A gate is a comparison of the gate language (`strata.core.comparison`), then its own no-data policy, if any.
_NO_DATA_OPTION = re.compile(r"\s+on-no-data=(\S*)\s*$")


@dataclass(frozen=True)
class Gate:
    """`metric op threshold`: the metric's value must satisfy the comparison. `on_no_data` overrides the rollout's
    no-data policy for this gate (None: the rollout's)."""

    metric: str
    op: str
    threshold: float
    on_no_data: str | None = None

    @property
    def text(self) -> str:
        policy = f" on-no-data={self.on_no_data}" if self.on_no_data else ""
        return f"{self.metric}{self.op}{self.threshold:g}{policy}"

    def holds(self, value: float) -> bool:
        return compare(value, self.op, self.threshold)

    def to_json(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"metric": self.metric, "op": self.op, "threshold": self.threshold}
        if self.on_no_data:
            raw["on_no_data"] = self.on_no_data
        return raw

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Gate:
        """Raises:
        ConfigError: not a gate this version knows.
        """
        policy = raw.get("on_no_data")
        return parse_gate(f"{raw['metric']}{raw['op']}{raw['threshold']}" + (f" on-no-data={policy}" if policy else ""))


DEFAULT_GATES: Final = (
    Gate("activation_success_rate", ">=", 0.95),
    Gate("error_rate_delta", "<=", 0.01),
    Gate("p95_latency_ratio", "<=", 1.5),
    Gate("drift_psi", "<=", 0.25),
)


def check_no_data_policy(policy: str, what: str = "--on-no-data") -> str:
    """The policy, if it is one.

    Raises:
        ConfigError: not one of NO_DATA_POLICIES.
    """
    if policy not in NO_DATA_POLICIES:
        raise ConfigError(f"{what} must be one of {', '.join(NO_DATA_POLICIES)}, got {policy!r}")
    return policy


def parse_gate(text: str) -> Gate:
    """`p95_latency_ratio<=1.5` (or `drift_psi<=0.25 on-no-data=pass`) -> Gate.

    Raises:
        ConfigError: not `METRIC OP NUMBER [on-no-data=POLICY]` (`parse_comparison`), or an unknown metric or
            policy.
    """
    comparison_text, policy = text, None
    option = _NO_DATA_OPTION.search(text)
    if option is not None:
        comparison_text, policy = text[: option.start()], check_no_data_policy(option[1], f"gate {text!r}: on-no-data")
    comparison = parse_comparison(comparison_text, METRICS, ORDERING)
    return Gate(comparison.metric, comparison.op, comparison.threshold, policy)


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
class DriftFigure:
    """One node's drift since its wave started: the largest PSI of its tensors (None: too few values yet), and the
    requests it served in that window, which the PSI rests on."""

    psi: float | None
    requests: int


@dataclass(frozen=True)
class Population:
    """A wave's evidence: how its nodes' activations went, and how canary and baseline nodes serve.

    `earlier_members`, `earlier_activated`, `earlier_failed`: the same counts over the waves before this one (as
    they stand now: a node of an earlier wave may fail after its wave passed).
    `drift_referenced`: the version's package carries drift references (else the drift gate does not apply).
    `baseline_nodes`: nodes still on an earlier version, whatever their traffic (with none, and none recorded,
    latency has nothing to compare with); `baseline_profiles`: the hardware profiles of those online (a canary
    profile among them waits for their traffic; one not among them, and not recorded, has no baseline of its own).
    """

    wave_members: int
    activated: int
    failed: int
    canary: tuple[ServingSample, ...]
    baseline: tuple[ServingSample, ...]
    recorded_baseline: Baseline = field(default_factory=Baseline)
    min_requests: int = 20
    canary_drift: tuple[DriftFigure, ...] = ()
    drift_referenced: bool = False
    min_drift_requests: int = 100
    baseline_nodes: int = 1
    baseline_profiles: frozenset[str] = frozenset()
    earlier_members: int = 0
    earlier_activated: int = 0
    earlier_failed: int = 0

    def usable(self, samples: Iterable[ServingSample]) -> list[ServingSample]:
        return [s for s in samples if s.counters.requests >= self.min_requests]


def summarize_baseline(population: Population) -> Baseline:
    """The live baseline's figures, or the recorded ones when no baseline node has enough traffic. Latency is kept
    per profile: a profile with no live figure keeps its recorded one (its baseline nodes took the new version in
    an earlier wave, or are idle now), so a later wave's canaries of that profile are still compared."""
    usable = population.usable(population.baseline)
    recorded = population.recorded_baseline
    if not usable:
        return recorded
    return Baseline(
        error_rate=robust_error_rate(usable, "baseline"),
        p95_by_profile={**recorded.p95_by_profile, **_p95_by_profile(usable)},
        nodes=len(usable),
    )


def robust_error_rate(samples: Iterable[ServingSample], side: str) -> float | None:
    """The nodes' pooled error rate (None: no requests), such that no one node's claim can move it toward a pass;
    `side` is "canary" (a higher rate fails) or "baseline" (a lower one makes the delta fail).

    A node's serving counters are what the node says: pooled plainly, one node claiming 10^15 requests without an
    error passed a canary whose other nodes failed half their requests, and one claiming all of 10^15 failed lifted
    the baseline so that any canary passed `error_rate_delta`. So each node weighs at most as much as the median node
    (the upper median: quiet nodes, whose one error in 25 requests is noise, do not pull the busy ones down to their
    weight; its errors scaled with it, its own rate kept), which bounds what fewer than half the nodes can do to what
    as many typical nodes would; and with two nodes or more, the one whose leaving out moves the rate most against
    the version is left out: the highest of the leave-one-out rates for a canary, the lowest for a baseline. For
    honest nodes of like traffic this is the plain pool less one node's share; a wave of two canaries is judged by
    the worse one.
    """
    counts = [(s.counters.requests, s.counters.errors) for s in samples if s.counters.requests > 0]
    if not counts:
        return None
    cap = statistics.median_high(requests for requests, _ in counts)
    weights = [min(requests, cap) for requests, _ in counts]
    errors = [failed * weight / requests for (requests, failed), weight in zip(counts, weights, strict=True)]
    total_weight, total_errors = sum(weights), sum(errors)
    if len(counts) == 1:
        return total_errors / total_weight
    rates = [(total_errors - error) / (total_weight - weight) for error, weight in zip(errors, weights, strict=True)]
    return max(rates) if side == "canary" else min(rates)


def _p95_by_profile(samples: list[ServingSample]) -> dict[str, float]:
    by_profile: dict[str, list[float]] = {}
    for sample in samples:
        if sample.counters.latency_p95_ms is not None:
            by_profile.setdefault(sample.profile, []).append(sample.counters.latency_p95_ms)
    return {profile: statistics.median(values) for profile, values in sorted(by_profile.items())}


# --- metrics --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """A metric's value (None: not enough data yet) and the numbers behind it, in words; `applicable` False when
    the metric cannot apply to this rollout at all (its detail says why); `complete` False when the value rests on
    part of the evidence only, the rest still to come: it can fail a gate, not pass one."""

    value: float | None
    detail: str
    applicable: bool = True
    complete: bool = True


def activation_success_rate(population: Population) -> Measure:
    """The wave's share, or the share over every wave so far when that is lower (only an earlier wave's failures
    can make it so)."""
    tried = population.activated + population.failed
    # A node counts once it reported healthy or failed; the rest (still loading, on probation) are said apart, so that
    # "0 of 26 that tried" beside a gauge of 74 nodes on the new version reads as what it is.
    rest = population.wave_members - tried
    wave = (
        f"{population.activated} of {plural(tried, 'node')} that tried activated it "
        f"({population.failed} failed{f', {rest} not healthy or failed yet' if rest > 0 else ''}; "
        f"wave of {population.wave_members})"
        if tried
        else f"no node has tried the version yet (wave of {population.wave_members})"
    )
    if population.earlier_failed and tried:  # a wave with no data has none: the earlier waves' rate may not pass it
        activated = population.activated + population.earlier_activated
        all_tried = tried + population.earlier_activated + population.earlier_failed
        members = population.wave_members + population.earlier_members
        rate = activated / all_tried
        if rate < population.activated / tried:
            return Measure(
                rate,
                f"{activated} of {plural(all_tried, 'node')} that tried activated it over every wave so far "
                f"({population.failed + population.earlier_failed} failed; {plural(members, 'node')}); this wave: "
                f"{wave}",
            )
    if not tried:
        return Measure(None, wave)
    return Measure(population.activated / tried, wave)


def error_rate(population: Population) -> Measure:
    usable = population.usable(population.canary)
    rate = robust_error_rate(usable, "canary")
    if rate is None:
        return Measure(None, f"no canary node has served {population.min_requests} requests yet")
    requests = sum(s.counters.requests for s in usable)
    errors = sum(s.counters.errors for s in usable)
    judged = ""
    if len(usable) > 1:  # what the value is, when it is not errors / requests
        judged = "; judged with no node weighing more than the median one and the one most in its favour left out"
    return Measure(
        rate,
        f"{plural(errors, 'error')} in {plural(requests, 'request')} on {plural(len(usable), 'canary node')}{judged}",
    )


def error_rate_delta(population: Population) -> Measure:
    canary = error_rate(population)
    if canary.value is None:
        return canary
    baseline = summarize_baseline(population)
    base = baseline.error_rate if baseline.error_rate is not None else 0.0
    source = f"{baseline.nodes} baseline nodes" if baseline.error_rate is not None else "no baseline traffic"
    return Measure(canary.value - base, f"canary {canary.value:.4f} vs baseline {base:.4f} ({source})")


def p95_latency_ratio(population: Population) -> Measure:
    """The worst canary profile's p95 over its baseline's: latency is compared within a hardware profile only (a
    Jetson is not slower than a Xeon by regression). A canary profile whose online baseline nodes have not served
    enough yet leaves the measure incomplete (a failing profile beside it fails the gate; passing ones wait for it,
    until the wave's deadline); one with no online node on an earlier version (and none recorded) is not compared,
    and the detail names it."""
    canary = _p95_by_profile(population.usable(population.canary))
    if not canary:
        return Measure(None, f"no canary node has served {population.min_requests} requests yet")
    baseline = summarize_baseline(population).p95_by_profile
    on_baseline = population.baseline_profiles
    shared = [p for p in canary if baseline.get(p, 0.0) > 0]
    waiting = [p for p in canary if p not in shared and p in on_baseline]
    unmatched = [p for p in canary if p not in shared and p not in on_baseline]
    alone = f"; not compared: {', '.join(unmatched)} (no node of it is left on an earlier version)" if unmatched else ""
    wait = (
        f"; waiting for the baseline nodes of {', '.join(waiting)} to serve {population.min_requests} requests"
        if waiting
        else ""
    )
    if shared:
        ratios = {p: canary[p] / baseline[p] for p in shared}
        worst = max(ratios, key=lambda p: ratios[p])
        return Measure(
            ratios[worst],
            f"{worst}: canary p95 {canary[worst]:.3g} ms vs baseline {baseline[worst]:.3g} ms "
            f"(profiles compared: {len(shared)}){wait}{alone}",
            complete=not waiting,
        )
    if waiting:
        return Measure(None, wait.removeprefix("; ") + alone)
    if not population.baseline_nodes and not population.recorded_baseline.nodes:
        return Measure(None, "no node runs an earlier version to compare with", applicable=False)
    return Measure(
        None,
        f"no canary profile has a baseline of its own (canary: {', '.join(canary)}; baseline: "
        f"{', '.join(sorted(on_baseline | set(baseline))) or 'none'}): latency is compared within a profile",
        applicable=False,
    )


def drift_psi(population: Population) -> Measure:
    if not population.drift_referenced:
        return Measure(None, "the package carries no drift reference (built without sample data)", applicable=False)
    least = population.min_drift_requests
    usable = [f.psi for f in population.canary_drift if f.psi is not None and f.requests >= least]
    if not usable:
        most = max((f.requests for f in population.canary_drift), default=0)
        return Measure(
            None,
            f"no canary node has served {least} requests since the wave started "
            f"(the most: {most}, over {plural(len(population.canary_drift), 'canary node')})",
        )
    worst = max(usable)
    return Measure(worst, f"largest PSI {worst:.3f} over {plural(len(usable), 'canary node')} with {least}+ requests")


METRICS: Final[dict[str, Callable[[Population], Measure]]] = {
    "activation_success_rate": activation_success_rate,
    "error_rate": error_rate,
    "error_rate_delta": error_rate_delta,
    "p95_latency_ratio": p95_latency_ratio,
    "drift_psi": drift_psi,
}


# --- evaluation -----------------------------------------------------------------------------------------


VERDICTS: Final = ("pass", "fail", "not_applicable", "no_data", "pass_no_data", "fail_no_data")
"""A gate's verdict: judged on data (pass, fail); cannot apply; or not enough data: waiting for it (no_data, the
`hold` policy before the wave's deadline), passed unjudged (`pass`), or failed for want of it (`fail`, or `hold`
once the deadline passed)."""

PASSING: Final = frozenset({"pass", "not_applicable", "pass_no_data"})


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome at one evaluation: the numbers, and the verdict on them."""

    gate: Gate
    wave: int
    value: float | None
    verdict: str
    detail: str

    @property
    def passed(self) -> bool:
        """The wave may go on as far as this gate is concerned."""
        return self.verdict in PASSING

    @property
    def waiting(self) -> bool:
        """Not enough data yet, and the gate waits for it."""
        return self.verdict == "no_data"

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate.text,
            "metric": self.gate.metric,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "wave": self.wave,
            "value": self.value,
            "on_no_data": self.gate.on_no_data,
            "passed": self.passed,
            "verdict": self.verdict,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> GateResult:
        value = None if raw.get("value") is None else float(raw["value"])
        verdict = raw.get("verdict")
        if verdict not in VERDICTS:  # recorded before verdicts: a pass without a value was a pass without data
            verdict = ("pass" if value is not None else "pass_no_data") if raw["passed"] else "fail"
        policy = raw.get("on_no_data")
        return cls(
            gate=Gate(str(raw["metric"]), str(raw["op"]), float(raw["threshold"]), str(policy) if policy else None),
            wave=int(raw["wave"]),
            value=value,
            verdict=str(verdict),
            detail=str(raw.get("detail", "")),
        )


def judge(gate: Gate, measure: Measure, on_no_data: str, waited_out: bool) -> tuple[str, str]:
    """(verdict, detail) of one gate on its measure. `on_no_data` is the rollout's policy (the gate's own wins);
    `waited_out`: the wave's deadline has passed, so a held gate waits no longer."""
    if not measure.applicable:
        return "not_applicable", f"not applicable: {measure.detail}"
    if measure.value is not None and not gate.holds(measure.value):
        return "fail", measure.detail
    if measure.value is not None and measure.complete:
        return "pass", measure.detail
    policy = gate.on_no_data or on_no_data
    if measure.value is not None and waited_out and policy == "hold":  # part of the evidence came, in time
        return "pass", f"{measure.detail}; judged at the wave's deadline on what was compared"
    if policy == "pass":
        return "pass_no_data", f"NOT JUDGED (on-no-data=pass): not enough data: {measure.detail}"
    if policy == "fail":
        return "fail_no_data", f"not enough data (on-no-data=fail): {measure.detail}"
    if waited_out:
        return "fail_no_data", f"not enough data by the wave's deadline: {measure.detail}"
    return "no_data", f"not enough data yet, waiting until the wave's deadline: {measure.detail}"


def evaluate_gates(
    gates: Iterable[Gate], population: Population, wave: int, on_no_data: str = "hold", waited_out: bool = False
) -> list[GateResult]:
    """Every gate on the wave's evidence (see `judge` for a gate without enough data)."""
    results = []
    for gate in gates:
        measure = METRICS[gate.metric](population)
        verdict, detail = judge(gate, measure, on_no_data, waited_out)
        results.append(GateResult(gate, wave, measure.value, verdict, detail))
    return results


def doomed(gates: Iterable[Gate], population: Population, wave: int) -> GateResult | None:
    """A gate the wave can no longer pass whatever its remaining nodes do, so the rollout may stop at once.

    Only the activation success rate can be known early: if every node still to try succeeded and the rate would
    still miss the threshold, over the wave or over every wave so far, waiting longer would only put the version on
    more nodes.
    """
    for gate in gates:
        if gate.metric != "activation_success_rate" or gate.op not in (">=", ">"):
            continue
        bests = [
            (members - failed) / members
            for members, failed in (
                (population.wave_members, population.failed),
                (
                    population.wave_members + population.earlier_members,
                    population.failed + population.earlier_failed,
                ),
            )
            if members and failed
        ]
        if not bests:
            continue
        best = min(bests)
        if not gate.holds(best):
            measure = activation_success_rate(population)
            return GateResult(
                gate,
                wave,
                measure.value,
                "fail",
                f"{measure.detail}; even if every remaining node succeeded the rate would be {best:.3f}",
            )
    return None
