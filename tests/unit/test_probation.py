"""Node-side probation, a pure judgement of counters and time, and the serving counters it reads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from strata.agent.probation import ProbationConfig, judge, reference_latency
from strata.agent.serving import ServingTracker, percentile
from strata.agent.state import ProbationRecord
from strata.core.wire import ServingCounters

CONFIG = ProbationConfig(duration_s=60, min_requests=20, min_errors=3, max_error_rate=0.05, max_latency_ratio=5)
RECORD = ProbationRecord(version="2", digest="sha256:" + "2" * 64, started_at=100.0, reference_p95_ms=4.0)


def counters(requests: int, errors: int = 0, p95: float | None = 4.0) -> ServingCounters:
    return ServingCounters(requests, errors, p95 if requests > errors else None, 100.0)


def test_a_quiet_healthy_activation_passes_when_its_time_is_up() -> None:
    assert judge(RECORD, None, CONFIG, 30.0).outcome == "running"
    assert judge(RECORD, counters(5), CONFIG, 59.0).outcome == "running"
    assert judge(RECORD, counters(5), CONFIG, 60.0).outcome == "passed"
    assert judge(RECORD, counters(500), CONFIG, 10.0).outcome == "passed"  # enough requests end it early


def test_restarts_of_the_agent_during_it_fail_it() -> None:
    """Each start of the agent during a probation counts (`ProbationRecord.restarts`); `max_restarts` fail it, even
    with healthy counters, which a version whose inference kills the agent never gets past zero."""
    restarted = replace(RECORD, restarts=2)
    assert judge(restarted, counters(500), CONFIG, 10.0).outcome == "passed"
    verdict = judge(replace(RECORD, restarts=3), counters(500), CONFIG, 10.0)
    assert verdict.failed
    assert verdict.reason.startswith("the agent restarted 3 times while this version was on probation")
    assert ProbationRecord.from_json(replace(RECORD, restarts=2).to_json()).restarts == 2
    older = {k: v for k, v in RECORD.to_json().items() if k != "restarts"}
    assert ProbationRecord.from_json(older).restarts == 0


def test_inference_errors_fail_it_as_soon_as_they_are_damning() -> None:
    assert judge(RECORD, counters(10, errors=2), CONFIG, 10.0).outcome == "running"  # too few to judge
    verdict = judge(RECORD, counters(40, errors=3), CONFIG, 10.0)
    assert verdict.failed
    assert verdict.reason == "inference errors: 3 of 40 requests failed (7.5% > 5.0%)"
    assert not judge(RECORD, counters(100, errors=3), CONFIG, 60.0).failed  # 3% is within the limit


def test_latency_is_judged_against_the_reference_on_enough_requests() -> None:
    assert judge(RECORD, counters(19, p95=40.0), CONFIG, 10.0).outcome == "running"
    verdict = judge(RECORD, counters(20, p95=40.0), CONFIG, 10.0)
    assert verdict.failed
    assert "10.0x the reference 4 ms" in verdict.reason
    assert judge(RECORD, counters(20, p95=12.0), CONFIG, 70.0).outcome == "passed"  # 3x is within 5x
    no_reference = ProbationRecord("2", RECORD.digest, 100.0, None)
    assert judge(no_reference, counters(50, p95=400.0), CONFIG, 70.0).outcome == "passed"


def test_the_reference_comes_from_the_manifest_when_it_records_one() -> None:
    assert reference_latency({"latency_ms": {"p95": 3.5, "p50": 2.0}}) == 3.5
    assert reference_latency({"latency_ms": 7}) == 7.0
    assert reference_latency({"latency_ms": {"p50": 2.0}}) is None
    assert reference_latency({"latency_ms": True}) is None
    assert reference_latency({}) is None


def test_the_tracker_counts_per_version_and_ignores_failures_that_are_not_the_models() -> None:
    now = [1000.0]
    tracker = ServingTracker(window=100, clock=lambda: now[0])
    assert tracker.counters("m", "1") is None
    for latency in range(1, 101):
        tracker.record_success("m", "1", float(latency))
    tracker.record_failure("m", "1", "internal")
    tracker.record_failure("m", "1", "bad_request")
    for _ in range(500):  # shed by admission control under overload: the model never saw them
        tracker.record_failure("m", "1", "rejected")
    got = tracker.counters("m", "1")
    assert got == ServingCounters(requests=101, errors=1, latency_p95_ms=95.0, since=1000.0)
    tracker.record_success("m", "2", 1.0)
    tracker.reset("m", "2", 2000.0)
    assert tracker.counters("m", "2") == ServingCounters(0, 0, None, 2000.0)
    tracker.forget("m", keep_version="2")
    assert tracker.counters("m", "1") is None
    for latency in range(200):
        tracker.record_success("m", "2", 1000.0 if latency < 100 else 1.0)
    assert tracker.samples("m", "2") == 100  # a bounded window of the most recent requests
    assert tracker.counters("m", "2") == ServingCounters(200, 0, 1.0, 2000.0)


def test_an_activation_that_did_not_happen_gives_back_the_counts_it_reset_with_those_taken_since() -> None:
    """Another package under the same version string (another variant of it) failed to activate: the served one's
    counts come back, with the requests it took meanwhile, which belong to it."""
    tracker = ServingTracker(window=100, clock=lambda: 1000.0)
    for _ in range(5):
        tracker.record_success("m", "1", 2.0)
    counted = tracker.reset("m", "1", 2000.0)
    tracker.add("m", "1", 3, 1, [4.0, 4.0, 4.0])  # another serving process's counts, collected meanwhile
    tracker.restore("m", "1", counted)
    assert tracker.counters("m", "1") == ServingCounters(requests=8, errors=1, latency_p95_ms=4.0, since=1000.0)

    fresh = tracker.reset("m", "2", 3000.0)  # a version that had counted nothing
    tracker.record_success("m", "2", 1.0)
    tracker.restore("m", "2", fresh)
    assert tracker.counters("m", "2") == ServingCounters(requests=1, errors=0, latency_p95_ms=1.0, since=3000.0)


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 0.95) is None
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([float(v) for v in range(1, 21)], 0.95) == 19.0
    assert percentile([float(v) for v in range(1, 21)], 0.5) == pytest.approx(10.0)
