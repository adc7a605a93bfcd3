"""Rollout gates: parsing, defaults, and each metric on a population of canary and baseline nodes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from strata.control.gates import (
    DEFAULT_GATES,
    METRICS,
    Baseline,
    DriftFigure,
    Gate,
    GateResult,
    Population,
    ServingSample,
    doomed,
    evaluate_gates,
    judge,
    merge_gates,
    parse_gate,
    summarize_baseline,
)
from strata.control.telemetry import ErrorRates, error_rates
from strata.core.errors import ConfigError
from strata.core.wire import ServingCounters


def sample(profile: str, p95: float, requests: int = 100, errors: int = 0) -> ServingSample:
    return ServingSample(profile, ServingCounters(requests, errors, p95, 0.0))


def population(**fields: object) -> Population:
    """A wave's evidence; unless given, every baseline sample's node is online (its profile in `baseline_profiles`,
    as the planner counts them)."""
    values: dict[str, object] = {"wave_members": 10, "activated": 10, "failed": 0, "canary": (), "baseline": ()}
    values.update(fields)
    baseline = values["baseline"]
    assert isinstance(baseline, tuple)
    values.setdefault("baseline_profiles", frozenset(sample.profile for sample in baseline))
    return Population(**values)


def by_metric(results: list[GateResult]) -> dict[str, GateResult]:
    return {r.gate.metric: r for r in results}


def test_gates_parse_and_replace_the_defaults_on_their_metric() -> None:
    assert parse_gate("p95_latency_ratio <= 2") == Gate("p95_latency_ratio", "<=", 2.0)
    assert parse_gate("activation_success_rate>=0.9").text == "activation_success_rate>=0.9"
    merged = merge_gates([parse_gate("p95_latency_ratio<=2"), parse_gate("error_rate<0.05")])
    assert {g.metric: g.threshold for g in merged} == {
        "activation_success_rate": 0.95,
        "error_rate_delta": 0.01,
        "p95_latency_ratio": 2.0,
        "drift_psi": 0.25,
        "error_rate": 0.05,
    }
    assert {g.metric for g in DEFAULT_GATES} == {
        "activation_success_rate",
        "error_rate_delta",
        "p95_latency_ratio",
        "drift_psi",
    }
    with pytest.raises(ConfigError, match="unknown metric"):
        parse_gate("drift<=0.2")
    for bad in ("latency", "p95_latency_ratio=<2", "happiness>=1", "error_rate<=nan"):
        with pytest.raises(ConfigError):
            parse_gate(bad)


def test_activation_success_rate_and_knowing_early_that_it_cannot_pass() -> None:
    gate = Gate("activation_success_rate", ">=", 0.9)
    result = evaluate_gates([gate], population(activated=8, failed=2), 0)[0]
    assert (result.value, result.passed) == (0.8, False)
    assert "8 of 10 nodes that tried" in result.detail
    alone = evaluate_gates([gate], population(wave_members=1, activated=0, failed=1), 0)[0]
    assert alone.detail == "0 of 1 node that tried activated it (1 failed; wave of 1)"  # not "1 nodes"
    # the nodes not counted yet are said apart: "0 of 26 that tried" read as a contradiction beside 74 on the version
    some = evaluate_gates([gate], population(wave_members=100, activated=0, failed=26), 0)[0]
    assert some.detail == "0 of 26 nodes that tried activated it (26 failed, 74 not healthy or failed yet; wave of 100)"
    assert doomed([gate], population(wave_members=20, activated=0, failed=2), 0) is None  # 18/20 = 0.9 still possible
    stop = doomed([gate], population(wave_members=20, activated=0, failed=3), 0)
    assert stop is not None
    assert not stop.passed
    nobody = evaluate_gates([gate], population(activated=0, failed=0), 0)[0]
    assert (nobody.value, nobody.verdict, nobody.passed) == (None, "no_data", False)
    # An earlier wave's failure does not give a wave without data of its own the earlier waves' rate: 99 of 100
    # would pass it, where with no earlier failure it has no data (and the no-data policy decides).
    earlier = population(activated=0, failed=0, earlier_members=100, earlier_activated=99, earlier_failed=1)
    late = evaluate_gates([gate], earlier, 0, "hold", True)[0]
    assert (late.value, late.passed) == (None, False)


def test_latency_ratio_is_judged_per_profile_and_the_worst_counts() -> None:
    canary = (sample("avx2", 4.4), sample("avx2", 4.6), sample("neon", 30.0), sample("neon", 31.0))
    baseline = (sample("avx2", 4.0), sample("avx2", 4.0), sample("neon", 10.0), sample("jetson", 2.0))
    result = by_metric(evaluate_gates(DEFAULT_GATES, population(canary=canary, baseline=baseline), 1))
    latency = result["p95_latency_ratio"]
    assert latency.value == pytest.approx(3.05)
    assert not latency.passed
    assert latency.detail.startswith("neon: canary p95 30.5 ms vs baseline 10 ms")
    assert result["activation_success_rate"].passed


def test_nodes_with_too_little_traffic_do_not_count() -> None:
    canary = (sample("avx2", 40.0, requests=5),)
    baseline = (sample("avx2", 4.0),)
    latency = by_metric(evaluate_gates(DEFAULT_GATES, population(canary=canary, baseline=baseline), 0))
    assert latency["p95_latency_ratio"].value is None
    assert latency["p95_latency_ratio"].waiting
    assert "no canary node has served 20 requests yet" in latency["p95_latency_ratio"].detail


def test_error_rates_and_the_recorded_baseline_when_no_baseline_node_is_left() -> None:
    canary = (sample("avx2", 4.0, requests=200, errors=10),)
    live = population(canary=canary, baseline=(sample("avx2", 4.0, requests=1000, errors=10),))
    results = by_metric(evaluate_gates([Gate("error_rate", "<=", 0.02), Gate("error_rate_delta", "<=", 0.01)], live, 0))
    assert results["error_rate"].value == pytest.approx(0.05)
    assert results["error_rate_delta"].value == pytest.approx(0.04)
    recorded = summarize_baseline(live)
    assert recorded == Baseline(error_rate=0.01, p95_by_profile={"avx2": 4.0}, nodes=1)
    assert Baseline.from_json(recorded.to_json()) == recorded

    last_wave = population(canary=(sample("avx2", 8.0),), baseline=(), recorded_baseline=recorded)
    latency = by_metric(evaluate_gates(DEFAULT_GATES, last_wave, 3))["p95_latency_ratio"]
    assert latency.value == pytest.approx(2.0)
    assert GateResult.from_json(latency.to_json()) == latency


def test_latency_is_compared_within_a_profile_only() -> None:
    canary = (sample("neon", 20.0),)
    baseline = (sample("avx2", 4.0), sample("avx2", 6.0))
    latency = by_metric(evaluate_gates(DEFAULT_GATES, population(canary=canary, baseline=baseline), 0))
    result = latency["p95_latency_ratio"]
    assert (result.verdict, result.value) == ("not_applicable", None)
    assert "no canary profile has a baseline of its own (canary: neon; baseline: avx2)" in result.detail


def test_a_canary_profile_without_a_baseline_is_named_and_one_whose_baseline_is_idle_is_waited_for() -> None:
    canary = (sample("avx2", 4.4), sample("jetson", 40.0))
    baseline = (sample("avx2", 4.0),)
    new_hardware = evaluate_gates(DEFAULT_GATES, population(canary=canary, baseline=baseline), 0)
    latency = by_metric(new_hardware)["p95_latency_ratio"]
    assert (latency.verdict, latency.value) == ("pass", pytest.approx(1.1))
    assert latency.detail.endswith("not compared: jetson (no node of it is left on an earlier version)")

    # a jetson node still on the old version has served too little: the avx2 ratio alone cannot pass the gate
    idle = population(canary=canary, baseline=(*baseline, sample("jetson", 4.0, requests=3)))
    latency = by_metric(evaluate_gates(DEFAULT_GATES, idle, 0))["p95_latency_ratio"]
    assert (latency.verdict, latency.value) == ("no_data", pytest.approx(1.1))
    assert "waiting for the baseline nodes of jetson to serve 20 requests" in latency.detail
    # at the wave's deadline the gate judges what it could compare, saying so (an idle standby cannot hold it)
    waited = by_metric(evaluate_gates(DEFAULT_GATES, idle, 0, waited_out=True))["p95_latency_ratio"]
    assert (waited.verdict, waited.value) == ("pass", pytest.approx(1.1))
    assert waited.detail.endswith("judged at the wave's deadline on what was compared")
    # ... nor can a node with no serving figures at all (it reported none yet)
    silent = population(canary=canary, baseline=baseline, baseline_profiles=frozenset({"avx2", "jetson"}))
    assert by_metric(evaluate_gates(DEFAULT_GATES, silent, 0))["p95_latency_ratio"].verdict == "no_data"

    # a profile that compares badly fails the gate at once, whatever the others still wait for
    slow = (sample("avx2", 12.0), sample("jetson", 40.0))
    failing = population(canary=slow, baseline=(*baseline, sample("jetson", 4.0, requests=3)))
    latency = by_metric(evaluate_gates(DEFAULT_GATES, failing, 0))["p95_latency_ratio"]
    assert (latency.verdict, latency.value) == ("fail", pytest.approx(3.0))


def test_a_profile_keeps_its_recorded_baseline_once_its_nodes_left_the_baseline() -> None:
    """Wave 1 saw jetson nodes on the old version; by wave 2 they all run the new one: jetson canaries are still
    compared with what the jetsons served before, not passed beside the avx2 nodes."""
    wave1 = population(canary=(sample("avx2", 4.0),), baseline=(sample("avx2", 4.0), sample("jetson", 10.0)))
    recorded = summarize_baseline(wave1)
    assert recorded.p95_by_profile == {"avx2": 4.0, "jetson": 10.0}
    wave2 = population(
        canary=(sample("avx2", 4.0), sample("jetson", 35.0)),
        baseline=(sample("avx2", 4.0),),
        recorded_baseline=recorded,
    )
    latency = by_metric(evaluate_gates(DEFAULT_GATES, wave2, 1))["p95_latency_ratio"]
    assert (latency.verdict, latency.value) == ("fail", pytest.approx(3.5))
    assert latency.detail.startswith("jetson: canary p95 35 ms vs baseline 10 ms (profiles compared: 2)")
    assert summarize_baseline(wave2).p95_by_profile == {"avx2": 4.0, "jetson": 10.0}


def test_drift_gate_takes_the_worst_canary_node_with_enough_requests() -> None:
    gate = parse_gate("drift_psi<=0.25")
    unreferenced = evaluate_gates([gate], population(), 0)[0]
    assert (unreferenced.verdict, unreferenced.passed) == ("not_applicable", True)
    assert "no drift reference" in unreferenced.detail
    figures = (DriftFigure(0.02, 500), DriftFigure(0.41, 300), DriftFigure(0.05, 120), DriftFigure(3.9, 40))
    shifted = population(canary_drift=figures, drift_referenced=True)
    result = evaluate_gates([gate], shifted, 0)[0]
    assert (result.value, result.verdict) == (0.41, "fail")  # the 40-request node's 3.9 is no evidence
    assert "3 canary nodes with 100+ requests" in result.detail


def test_one_smoke_request_is_not_evidence_of_drift() -> None:
    """Issue 17: a canary smoke-tested with one fixed request showed PSI 4.0; that is not enough data to judge."""
    gate = parse_gate("drift_psi<=0.25")
    smoke = population(canary_drift=(DriftFigure(4.005, 1),), drift_referenced=True)
    result = evaluate_gates([gate], smoke, 0)[0]
    assert (result.value, result.verdict, result.passed) == (None, "no_data", False)
    assert "no canary node has served 100 requests since the wave started (the most: 1" in result.detail
    assert evaluate_gates([gate], replace(smoke, min_drift_requests=1), 0)[0].verdict == "fail"


def test_the_no_data_policy_decides_and_never_passes_silently() -> None:
    gate = parse_gate("p95_latency_ratio<=1.5")
    quiet = population(canary=(sample("avx2", 40.0, requests=3),), baseline=(sample("avx2", 4.0),))
    verdicts = {
        (policy, late): evaluate_gates([gate], quiet, 0, policy, late)[0] for policy in ("hold", "pass", "fail")
        for late in (False, True)
    }  # fmt: skip
    assert verdicts[("hold", False)].verdict == "no_data"
    assert verdicts[("hold", True)].verdict == "fail_no_data"
    assert "by the wave's deadline" in verdicts[("hold", True)].detail
    assert {verdicts[("pass", late)].verdict for late in (False, True)} == {"pass_no_data"}
    assert verdicts[("pass", False)].detail.startswith("NOT JUDGED")
    assert {verdicts[("fail", late)].verdict for late in (False, True)} == {"fail_no_data"}
    assert all(r.value is None for r in verdicts.values())
    for result in verdicts.values():  # whatever the verdict, the record says the gate had no data
        assert result.verdict != "pass"
        assert GateResult.from_json(result.to_json()) == result

    own = parse_gate("p95_latency_ratio<=1.5 on-no-data=pass")  # a gate's own policy wins over the rollout's
    assert own == Gate("p95_latency_ratio", "<=", 1.5, "pass")
    assert parse_gate(own.text) == own
    assert Gate.from_json(own.to_json()) == own
    assert evaluate_gates([own], quiet, 0, "fail")[0].verdict == "pass_no_data"
    with pytest.raises(ConfigError, match="on-no-data must be one of hold, pass, fail"):
        parse_gate("p95_latency_ratio<=1.5 on-no-data=maybe")

    first = population(canary=(sample("avx2", 4.0),), baseline_nodes=0)  # no node left on an earlier version
    latency = evaluate_gates([gate], first, 0)[0]
    assert (latency.verdict, latency.passed) == ("not_applicable", True)
    assert judge(gate, METRICS["p95_latency_ratio"](quiet), "hold", waited_out=False)[0] == "no_data"


def test_a_result_recorded_before_verdicts_says_it_passed_without_data() -> None:
    raw = {"metric": "p95_latency_ratio", "op": "<=", "threshold": 1.5, "wave": 0, "value": None, "passed": True}
    assert GateResult.from_json(raw).verdict == "pass_no_data"
    assert GateResult.from_json({**raw, "value": 1.2}).verdict == "pass"
    assert GateResult.from_json({**raw, "value": 2.0, "passed": False}).verdict == "fail"


def test_one_node_claiming_vast_traffic_cannot_pass_a_failing_canary() -> None:
    """A node's serving counters are its claim: pooled plainly, one canary claiming 10^15 requests without an error
    made three canaries failing half their requests read 1.5e-12, and the wave went on."""
    failing = tuple(sample("avx2", 4.0, requests=1000, errors=500) for _ in range(3))
    gate = [Gate("error_rate", "<=", 0.01)]
    for liars in (
        (sample("avx2", 4.0, requests=10**15),),
        (sample("avx2", 4.0, requests=20),),  # as little as counts, to pull the median weight down
        (sample("avx2", 4.0, requests=10**15), sample("avx2", 4.0, requests=10**15)),  # two: weighed as two nodes
    ):
        result = by_metric(evaluate_gates(gate, population(canary=(*failing, *liars)), 0))["error_rate"]
        assert not result.passed, liars
        assert result.value is not None
        assert result.value >= 0.3, liars
    # one liar beside one failing canary: the worse node judges a wave of two
    pair = by_metric(evaluate_gates(gate, population(canary=(failing[0], sample("avx2", 4.0, requests=10**15))), 0))
    assert pair["error_rate"].value == pytest.approx(0.5)


def test_one_node_claiming_every_request_failed_cannot_lift_the_baseline() -> None:
    """error_rate_delta, a default gate: a baseline node claiming all of 10^15 requests failed made the baseline's
    rate 1.0, so any canary passed."""
    healthy = tuple(sample("avx2", 4.0, requests=1000, errors=1) for _ in range(5))
    liar = sample("avx2", 4.0, requests=10**15, errors=10**15)
    canary = (sample("avx2", 4.0, requests=1000, errors=100),)
    result = by_metric(evaluate_gates(DEFAULT_GATES, population(canary=canary, baseline=(*healthy, liar)), 0))
    assert result["error_rate_delta"].value == pytest.approx(0.1 - 0.001)
    assert not result["error_rate_delta"].passed
    assert summarize_baseline(population(baseline=(*healthy, liar))).error_rate == pytest.approx(0.001)


def test_honest_canaries_of_like_traffic_are_judged_as_pooled_less_the_best_one() -> None:
    canary = tuple(sample("avx2", 4.0, requests=1000, errors=e) for e in (10, 10, 10, 50))
    result = by_metric(evaluate_gates([Gate("error_rate", "<=", 0.05)], population(canary=canary), 0))["error_rate"]
    assert result.value == pytest.approx(70 / 3000)  # a node of 10 errors left out; the plain pool is 0.02
    assert result.passed
    assert result.detail == (
        "80 errors in 4000 requests on 4 canary nodes; judged with no node weighing more than the median one and the"
        " one most in its favour left out"
    )
    # two quiet canaries (one error in 25 requests: noise) beside two busy ones judge no more than their weight
    quiet = (sample("avx2", 4.0, requests=25, errors=1),) * 2 + (sample("avx2", 4.0, requests=10_000, errors=10),) * 2
    mixed_traffic = by_metric(evaluate_gates([Gate("error_rate", "<=", 0.01)], population(canary=quiet), 0))
    assert mixed_traffic["error_rate"].value == pytest.approx(12 / 10_050)  # a busy one left out: the plain 0.11%
    assert mixed_traffic["error_rate"].passed
    # a gateway with 50x a device's traffic weighs as the median node, its own rate kept
    mixed = (sample("avx2", 4.0, requests=50_000, errors=0), *canary[:2])
    assert by_metric(evaluate_gates([Gate("error_rate", "<=", 0.05)], population(canary=mixed), 0))[
        "error_rate"
    ].value == pytest.approx(0.01)


def test_the_telemetry_error_rate_is_the_gates_over_the_same_requests() -> None:
    # A canary node took on 90 requests and failed 4; besides them it refused 6 malformed ones and shed 4 (busy). Its
    # serving counters (the status report the gates read) count the 90 and the 4; its telemetry counts all 100 and
    # 14 errors, 6 of them the caller's and 4 shed: the same error rate, the rest beside it.
    measured = METRICS["error_rate"](population(canary=(sample("cpu", 1.0, requests=90, errors=4),)))
    rates = error_rates(requests=100, errors=14, client_errors=6, shed=4)
    assert measured.value is not None
    assert rates.error_rate == round(measured.value, 6) == round(4 / 90, 6)
    assert (rates.client_error_rate, rates.shed_rate) == (0.06, 0.04)
    # nothing taken on (every request malformed or shed), or no requests at all: no error rate to speak of
    assert error_rates(requests=5, errors=5, client_errors=2, shed=3) == ErrorRates(0.0, 0.4, 0.6)
    assert error_rates(requests=0, errors=0, client_errors=0, shed=0) == ErrorRates(0.0, 0.0, 0.0)
