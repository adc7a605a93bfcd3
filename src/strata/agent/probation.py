"""Probation after an activation, as a pure decision: `judge(record, counters, config, served_s) -> Verdict`.

A package that loaded and passed its golden check may still misbehave on real traffic. For a short while after
activating it (a minute, or until enough requests were judged) the node watches its inference errors and its
p95 compute latency against a reference: the package's recorded figure (manifest `metrics.latency_ms.p95`) when
it has one, else what the version it replaced measured on this node. A failed probation makes the agent go back
to its previous slot by itself, with or without a control plane. The limits are deliberately wide (5x latency):
they catch gross failures on one node; the rollout's gates compare whole waves against the fleet more finely.
The simulator runs this same function against its virtual clock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from strata.agent.state import ProbationRecord
from strata.core.wire import ServingCounters


@dataclass(frozen=True)
class ProbationConfig:
    """The probation's limits. `duration_s` 0 turns probation off (a passed golden check is enough)."""

    duration_s: float = 60.0
    pass_requests: int = 500  # ends early once this many requests were judged healthy
    min_requests: int = 20  # latency is judged on at least this many successful requests
    min_errors: int = 3  # error rate is judged once at least this many requests failed
    max_error_rate: float = 0.05
    max_latency_ratio: float = 5.0
    check_interval_s: float = 5.0
    max_restarts: int = 3  # the agent restarted this often while the version was on probation: a failure

    @property
    def enabled(self) -> bool:
        return self.duration_s > 0


@dataclass(frozen=True)
class Verdict:
    """`running` (keep watching), `passed`, or `failed` with the reason in numbers."""

    outcome: str
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"


RUNNING = Verdict("running")


def reference_latency(metrics: Mapping[str, Any]) -> float | None:
    """The p95 latency in ms a package's manifest records (`latency_ms: {p95: ...}` or `latency_ms: <number>`)."""
    figure = metrics.get("latency_ms")
    if isinstance(figure, Mapping):
        figure = figure.get("p95")
    if isinstance(figure, int | float) and not isinstance(figure, bool) and figure > 0:
        return float(figure)
    return None


def judge(
    record: ProbationRecord, counters: ServingCounters | None, config: ProbationConfig, served_s: float
) -> Verdict:
    """Decide a probation from the counters of the activation it watches, `served_s` seconds after it began (or
    after the agent's last restart, when its counters began again): the agent measures them on the monotonic clock,
    the simulator on its virtual one, so that no step of a wall clock ends a probation early or holds it.

    Fails as soon as the numbers are damning (errors over the rate with at least `min_errors`, or p95 latency
    over `max_latency_ratio` x the reference on at least `min_requests` successes), or the agent restarted
    `max_restarts` times during it; passes when `duration_s` has gone by (since the last restart), or `pass_requests`
    requests were served, without that.
    """
    if record.restarts >= config.max_restarts:
        return Verdict(
            "failed",
            f"the agent restarted {record.restarts} times while this version was on probation (a crash in its"
            " inference?)",
        )
    requests = counters.requests if counters else 0
    errors = counters.errors if counters else 0
    if errors >= config.min_errors and errors > config.max_error_rate * requests:
        return Verdict(
            "failed",
            f"inference errors: {errors} of {requests} requests failed "
            f"({errors / requests:.1%} > {config.max_error_rate:.1%})",
        )
    p95 = counters.latency_p95_ms if counters else None
    reference = record.reference_p95_ms
    if (
        p95 is not None
        and reference is not None
        and requests - errors >= config.min_requests
        and p95 > config.max_latency_ratio * reference
    ):
        return Verdict(
            "failed",
            f"p95 latency {p95:.3g} ms is {p95 / reference:.1f}x the reference {reference:.3g} ms "
            f"({record.reference}); the limit is {config.max_latency_ratio:g}x",
        )
    if served_s >= config.duration_s or requests >= config.pass_requests:
        return Verdict("passed", f"{requests} requests, {errors} errors, p95 {p95 if p95 is not None else '-'} ms")
    return RUNNING
