"""The rollout planner, a pure function of (rollout, observations, now): waves, releases, bake, deadlines, gates."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import pytest

from strata.control.gates import Gate
from strata.control.rollout_plan import (
    Complete,
    Halt,
    NodeAssignment,
    NodeObservation,
    Release,
    RolloutSpec,
    RolloutState,
    StartWave,
    WaveSpec,
    apply_actions,
    member_states,
    named_nodes,
    next_due,
    parse_waves,
    plan_rollout,
    spread_order,
    wave_sizes,
)
from strata.core.errors import ConfigError
from strata.core.wire import Failure, ServingCounters

PROFILES = ("x86_64-avx2", "arm64-neon", "jetson-cuda")
REGIONS = ("eu-west", "us-east")


def node(
    i: int,
    *,
    version: str | None = "1",
    online: bool = True,
    probation: str | None = "passed",
    p95: float = 4.0,
    requests: int = 100,
    errors: int = 0,
    failure: Failure | None = None,
    excluded: str | None = None,
) -> NodeObservation:
    return NodeObservation(
        node_id=f"n{i:03d}",
        labels={"region": REGIONS[i % 2]},
        tier="device" if i % 3 else "near-edge",
        profile=PROFILES[i % 3],
        online=online,
        version=version,
        probation=probation,
        serving=ServingCounters(requests, errors, p95, 0.0) if version else None,
        failure=failure,
        excluded=excluded,
    )


def fleet(count: int, **fields: object) -> dict[str, NodeObservation]:
    return {o.node_id: o for o in (node(i, **fields) for i in range(count))}


def rollout(waves: str = "1,50%", **spec: object) -> RolloutState:
    return RolloutState(
        id=7,
        model="digits",
        version="2",
        selector={},
        spec=RolloutSpec(waves=parse_waves(waves), bake_s=60, wave_deadline_s=600, **spec),
        created_at=0.0,
    )


def step(state: RolloutState, observations: dict[str, NodeObservation], now: float) -> RolloutState:
    return apply_actions(state, plan_rollout(state, observations, now))


def take(
    observations: dict[str, NodeObservation],
    state: RolloutState,
    probation: str = "passed",
    p95: float = 4.0,
    requests: int = 100,
    errors: int = 0,
) -> None:
    """Released nodes report running the new version, with these figures."""
    for node_id in state.released:
        observations[node_id] = replace(
            observations[node_id],
            version="2",
            probation=probation,
            serving=ServingCounters(requests, errors, p95, 0.0),
        )


def test_waves_parse_grow_and_end_at_everyone() -> None:
    assert [w.text for w in parse_waves("1%,10%,50%,100%")] == ["1%", "10%", "50%", "100%"]
    assert [w.text for w in parse_waves("5, 50")] == ["5", "50", "100%"]
    for bad in ("", "0", "10%,5%", "150%", "2.5", "x"):
        with pytest.raises(ConfigError):
            parse_waves(bad)
    assert wave_sizes(parse_waves("1%,10%,50%,100%"), 10_000) == [100, 1000, 5000, 10_000]
    assert wave_sizes(parse_waves("1%,10%"), 3) == [1, 1, 3]  # at least one node, never shrinking
    assert WaveSpec(1, True).target(0) == 0


@pytest.mark.parametrize("bad", ["nan%", "1%,nan%", "nan", "inf", "-inf%", "1e400", "1e400%"])
def test_a_wave_that_is_not_a_finite_number_is_a_config_error(bad: str) -> None:
    # nan% passed every range check, was stored, and then raised ValueError at the rollout's first step; nan, inf
    # and 1e400 raised ValueError or OverflowError (a 500) instead of the 400 a bad wave gets.
    with pytest.raises(ConfigError, match="wave"):
        parse_waves(bad)


def test_a_bake_time_or_deadline_that_is_not_a_number_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        RolloutSpec(bake_s=float("nan"))
    with pytest.raises(ConfigError):
        RolloutSpec(wave_deadline_s=float("nan"))


def test_early_waves_spread_across_regions_tiers_and_profiles_and_prefer_online_nodes() -> None:
    observations = list(fleet(60).values())
    observations[0] = replace(observations[0], online=False)
    order = spread_order(1, observations)
    assert sorted(order) == sorted(o.node_id for o in observations)
    by_id = {o.node_id: o for o in observations}
    first = [by_id[n] for n in order[:6]]
    assert {o.profile for o in first} == set(PROFILES)
    assert {o.labels["region"] for o in first} == set(REGIONS)
    assert {o.tier for o in first} == {"device", "near-edge"}
    assert order[-1] == "n000"  # the offline node goes last
    assert spread_order(1, observations) == order  # deterministic per rollout
    assert spread_order(2, observations) != order


def test_a_good_rollout_releases_wave_by_wave_after_the_bake() -> None:
    observations = fleet(10)
    state = step(rollout("1,50%"), observations, 0.0)
    assert Counter(a.wave for a in state.nodes.values()) == {0: 1, 1: 4, 2: 5}
    assert state.wave == 0
    assert state.wave_started_at == 0.0
    assert len(state.released) == 1

    take(observations, state, probation="running")
    state = step(state, observations, 10.0)
    assert all(a.healthy_at is None for a in state.nodes.values())  # still on probation: not healthy yet
    assert state.message.startswith("wave 1: 1 on probation")
    take(observations, state, probation="passed")
    state = step(state, observations, 20.0)
    assert [a.healthy_at for a in state.nodes.values() if a.healthy_at] == [20.0]
    state = step(state, observations, 79.0)
    assert state.wave == 0  # baking until 80
    actions = plan_rollout(state, observations, 80.0)
    assert any(isinstance(a, StartWave) and a.wave == 1 for a in actions)
    state = apply_actions(state, actions)
    assert len(state.released) == 5
    assert [r.passed for r in state.gate_results] == [True, True, True, True]  # the default gates, drift included

    take(observations, state)
    state = step(step(state, observations, 90.0), observations, 150.0)
    assert state.wave == 2
    assert len(state.released) == 10
    take(observations, state)
    state = step(state, observations, 160.0)
    actions = plan_rollout(state, observations, 220.0)
    assert any(isinstance(a, Complete) for a in actions)
    assert apply_actions(state, actions).status == "succeeded"
    assert plan_rollout(apply_actions(state, actions), observations, 300.0) == []


def test_a_wave_with_no_node_of_its_own_is_passed_not_held_until_its_deadline() -> None:
    # Three nodes and the default waves: targets 1, 1, 2, 3, so the second wave has no node of its own. Its gates
    # had nothing to judge, waited for data until the deadline and rolled a healthy rollout back (small fleets,
    # every time).
    observations = fleet(3)
    state = step(rollout("1%,10%,50%,100%"), observations, 0.0)
    assert Counter(a.wave for a in state.nodes.values()) == {0: 1, 2: 1, 3: 1}
    take(observations, state)
    state = step(state, observations, 10.0)
    actions = plan_rollout(state, observations, 70.0)  # the canary has baked: wave 2 is empty, wave 3 starts
    assert [a.wave for a in actions if isinstance(a, StartWave)] == [1, 2]
    state = apply_actions(state, actions)
    assert (state.wave, len(state.released)) == (2, 2)
    take(observations, state)
    state = step(step(state, observations, 80.0), observations, 140.0)
    assert (state.wave, len(state.released)) == (3, 3)
    take(observations, state)
    state = step(step(state, observations, 150.0), observations, 210.0)
    assert (state.status, state.message) == ("succeeded", "every wave passed its gates")


def test_a_rollout_whose_every_node_is_kept_out_finishes_at_once_and_says_so() -> None:
    """It ends aborted, not succeeded: a succeeded rollout stands for its selector (nodes matching later take its
    version), and this one judged no node; once the pin is gone, every node would have taken the version at once."""
    observations = {k: replace(o, excluded="pinned to 1 (pin 3)") for k, o in fleet(2).items()}
    state = step(rollout("1%,10%,50%,100%"), observations, 0.0)
    assert state.status == "aborted"
    assert state.released == frozenset()
    assert state.message == (
        "no node took part: the selector matches 2 nodes, all kept out or refusing the version (see the nodes kept out)"
    )
    empty = step(rollout(), {}, 0.0)
    assert (empty.status, empty.message) == ("aborted", "no node took part: the selector matches no node")


def test_a_wave_whose_every_node_refuses_the_version_gives_way_to_the_next_at_once() -> None:
    observations = fleet(4)
    state = step(rollout("1,100%"), observations, 0.0)
    [canary] = state.released
    refused = Failure("digits", "2", None, "no variant for arm64-neon", 1.0, kind="no-variant")
    observations[canary] = replace(observations[canary], failure=refused)
    state = step(state, observations, 1.0)
    assert state.nodes[canary].refused
    assert (state.status, state.wave, len(state.released)) == ("running", 1, 3)  # not held until the deadline


def test_offline_nodes_stop_holding_a_wave_at_its_deadline_and_stay_released() -> None:
    observations = fleet(4)
    state = step(rollout("100%"), observations, 0.0)
    late = sorted(state.released)[0]
    observations[late] = replace(observations[late], online=False)
    for node_id in state.released - {late}:
        observations[node_id] = replace(observations[node_id], version="2")
    state = step(state, observations, 10.0)
    state = step(state, observations, 100.0)
    assert state.status == "running"
    assert state.message == "wave 1: 1 offline; offline nodes stop holding it 10m after it started"  # not +600s
    state = step(state, observations, 600.0)  # the deadline
    assert state.status == "succeeded"
    assert late in state.released  # it gets the version whenever it returns
    assert state.nodes[late].state == "updating"
    assert state.nodes[late].outcome(state.status) == "unconfirmed"  # not "updating": the rollout is over


def test_past_the_deadline_online_nodes_updating_or_waiting_for_max_unavailable_still_hold_the_wave() -> None:
    # Every unfinished node stopped holding the wave at its deadline: the rollout succeeded with 2 of 20 nodes
    # healthy, and the 16 that --max-unavailable had held back were then all sent the version at once, unjudged.
    observations = fleet(20)
    state = step(rollout("100%", max_unavailable=2), observations, 0.0)
    take(observations, state)
    state = step(state, observations, 10.0)  # healthy; two more are released, and stay online on 1
    state = step(state, observations, 600.0)  # the deadline
    assert (state.status, len(state.released)) == ("running", 4)
    assert state.message == (
        "wave 1: 2 updating, 16 waiting for release (--max-unavailable 2); past its deadline, only offline nodes stop"
        " holding it"
    )
    for node_id in state.released:  # the slow ones go offline: they stop holding it, and make room
        if observations[node_id].version == "1":
            observations[node_id] = replace(observations[node_id], online=False)
    state = step(state, observations, 601.0)
    assert (state.status, len(state.released)) == ("running", 6)


def test_past_the_deadline_nodes_on_probation_hold_the_wave_and_their_rollbacks_are_judged() -> None:
    observations = fleet(10)
    state = step(rollout("100%"), observations, 0.0)
    take(observations, state, probation="running")
    state = step(state, observations, 600.0)
    assert state.status == "running"  # it succeeded, and the rollbacks that followed were never judged
    assert state.message.startswith("wave 1: 10 on probation; past its deadline")
    late = sorted(state.released)[:3]
    rollback = Failure("digits", "2", "v", "probation failed: errors 30%", 601.0, kind="probation")
    for node_id in late:
        observations[node_id] = replace(observations[node_id], version="1", failure=rollback)
    state = step(state, observations, 601.0)
    assert state.status == "rolled_back"


def test_a_node_healthy_only_after_the_deadline_counts_once_it_has_baked() -> None:
    # It was left out of the count: the wave read "no node has been reachable yet" for ever.
    observations = fleet(50)
    state = step(rollout("1,100%"), observations, 0.0)
    [canary] = state.released
    observations[canary] = replace(observations[canary], online=False)
    state = step(state, observations, 10.0)
    observations[canary] = replace(observations[canary], online=True)
    take(observations, state)
    state = step(state, observations, 700.0)  # back after the deadline, healthy
    assert state.message == "wave 1: 1 baking; past its deadline, only offline nodes stop holding it"
    state = step(state, observations, 760.0)
    assert (state.status, state.wave) == ("running", 1)

    # A deadline shorter than an activation (0 is allowed) hung every rollout the same way.
    observations = fleet(10)
    quick = rollout("2,100%")
    state = step(replace(quick, spec=replace(quick.spec, wave_deadline_s=0.0)), observations, 0.0)
    take(observations, state, probation="running")
    state = step(state, observations, 30.0)
    take(observations, state)
    state = step(state, observations, 90.0)
    state = step(state, observations, 150.0)
    assert (state.status, state.wave) == ("running", 1)


@pytest.mark.parametrize(("on_no_data", "status", "wave"), [("hold", "rolled_back", 0), ("pass", "running", 1)])
def test_a_wave_whose_nodes_are_all_gone_or_offline_at_its_deadline_goes_by_the_no_data_policy(
    on_no_data: str, status: str, wave: int
) -> None:
    # It waited for ever ("no node has been reachable yet").
    observations = fleet(50)
    state = step(rollout("2,100%", on_no_data=on_no_data), observations, 0.0)
    gone, offline = sorted(state.released)
    del observations[gone]  # revoked, or its labels no longer match
    observations[offline] = replace(observations[offline], online=False)
    state = step(state, observations, 10.0)
    assert state.status == "running"
    state = step(state, observations, 600.0)
    assert (state.status, state.wave) == (status, wave)
    activation = next(r for r in state.gate_results if r.gate.metric == "activation_success_rate")
    assert activation.verdict == ("fail_no_data" if on_no_data == "hold" else "pass_no_data")


def test_a_finished_rollout_says_what_its_nodes_ended_as_not_where_they_stood() -> None:
    pending = NodeAssignment("p", 0, "1")
    released = replace(pending, released_at=1.0)
    ran_it = replace(released, ever_on_target=True)  # on the version, its probation or bake not over
    healthy = replace(ran_it, healthy_at=2.0)
    failed = replace(released, failed_at=2.0, failure="health: output differs")
    excluded = replace(pending, wave=None, excluded="pinned to 1 (pin 1)")
    every = (pending, released, ran_it, healthy, failed, excluded)
    ended = {status: [a.outcome(status) for a in every] for status in ("running", "succeeded", "aborted")}
    assert ended["running"] == ["pending", "updating", "updating", "healthy", "failed", "excluded"]
    assert ended["succeeded"] == ["unconfirmed", "unconfirmed", "unconfirmed", "healthy", "failed", "excluded"]
    assert ended["aborted"] == ["unchanged", "unchanged", "rolled_back", "rolled_back", "failed", "excluded"]
    assert [a.outcome("rolled_back") for a in every] == ended["aborted"]
    for status, outcomes in ended.items():  # the waves' columns hold every state a member can be in
        assert set(outcomes) - {"excluded"} == set(member_states(status))


def test_max_unavailable_limits_how_many_online_nodes_update_at_once() -> None:
    observations = fleet(6)
    state = step(rollout("100%", max_unavailable=2), observations, 0.0)
    assert len(state.released) == 2
    state = step(state, observations, 5.0)
    assert len(state.released) == 2  # both still updating
    take(observations, state)
    state = step(state, observations, 10.0)
    assert len(state.released) == 4


def test_a_failing_canary_halts_at_once_and_rolls_back() -> None:
    observations = fleet(40)
    state = step(rollout("5,100%"), observations, 0.0)
    canary = sorted(state.released)
    failure = Failure("digits", "2", "arm64-neon-fp32", "health check failed", 1.0, kind="health")
    observations[canary[0]] = replace(observations[canary[0]], failure=failure)
    actions = plan_rollout(state, observations, 5.0)
    halt = next(a for a in actions if isinstance(a, Halt))
    assert halt.rollback
    assert halt.gate.gate.metric == "activation_success_rate"
    assert "even if every remaining node succeeded the rate would be 0.800" in halt.gate.detail
    state = apply_actions(state, actions)
    assert state.status == "rolled_back"
    assert state.failed_gate == halt.gate
    assert state.nodes[canary[0]].state == "failed"
    assert not any(isinstance(a, Release) for a in actions)


def test_a_probation_rollback_counts_as_a_failure_and_as_having_run_it() -> None:
    observations = fleet(3)
    state = step(rollout("100%", on_failure="pause"), observations, 0.0)
    victim = sorted(state.released)[0]
    failure = Failure("digits", "2", "v", "probation failed: p95 latency 30 ms is 6.0x", 1.0, kind="probation")
    observations[victim] = replace(observations[victim], failure=failure)
    state = step(state, observations, 5.0)
    assert state.status == "paused"
    assert state.nodes[victim].ever_on_target
    assert state.nodes[victim].failure is not None
    assert "probation" in state.nodes[victim].failure


def test_a_canary_that_fails_its_probation_after_its_wave_passed_still_counts_against_the_rollout() -> None:
    # Only the current wave's nodes were counted: a wave-1 node whose probation rolled back once wave 2 had started
    # was marked failed, and the rollout then succeeded with "10 of 10 nodes that tried activated it".
    observations = fleet(12)
    state = step(rollout("2,100%"), observations, 0.0)
    first, late = sorted(state.released)
    take(observations, state)
    observations[late] = replace(observations[late], probation="running")
    state = step(state, observations, 540.0)  # the first canary is healthy; the second passes its probation...
    observations[late] = replace(observations[late], probation="passed")
    state = step(step(state, observations, 550.0), observations, 610.0)
    assert (state.status, state.wave, len(state.released)) == ("running", 1, 12)
    rollback = Failure("digits", "2", "v", "probation failed: p95 latency 30 ms is 6.0x", 611.0, kind="probation")
    observations[late] = replace(observations[late], version="1", failure=rollback)  # ...and rolls back later
    take(observations, replace(state, nodes={n: a for n, a in state.nodes.items() if n not in (first, late)}))
    state = step(state, observations, 611.0)
    assert state.nodes[late].state == "failed"
    assert state.status == "rolled_back"  # 11 of 12 at best: under 0.95, whatever wave 2 does
    assert state.failed_gate is not None
    assert state.failed_gate.gate.metric == "activation_success_rate"
    assert "over every wave so far" in state.failed_gate.detail
    assert "would be 0.917" in state.failed_gate.detail


def test_latency_and_error_gates_compare_canary_with_baseline_per_profile() -> None:
    observations = fleet(30)
    state = step(rollout("6,100%", on_failure="pause"), observations, 0.0)
    take(observations, state, p95=10.0)  # 2.5x the baseline's 4 ms on every profile
    state = step(state, observations, 1.0)
    state = step(state, observations, 61.0)
    assert state.status == "paused"
    assert state.failed_gate is not None
    assert state.failed_gate.gate.metric == "p95_latency_ratio"
    assert state.failed_gate.value == pytest.approx(2.5)
    assert state.baseline.p95_by_profile == dict.fromkeys(PROFILES, 4.0)

    observations = fleet(30)
    state = step(rollout("6,100%", gates=(Gate("error_rate_delta", "<=", 0.01),)), observations, 0.0)
    take(observations, state, errors=5)
    state = step(step(state, observations, 1.0), observations, 61.0)
    assert state.status == "rolled_back"
    assert state.failed_gate is not None
    assert state.failed_gate.value == pytest.approx(0.05)


def test_a_slow_canary_profile_is_not_passed_beside_healthy_ones() -> None:
    """A Jetson canary 10x slower passed beside healthy x86 and Arm canaries ("profiles compared: 2"): the Jetsons
    still on the old version had reported no serving figures yet. The wave now waits for them; once they have, it
    fails on the Jetson's own ratio."""
    observations = fleet(9)
    state = step(rollout("3,100%", on_failure="pause"), observations, 0.0)
    assert {observations[n].profile for n in state.released} == set(PROFILES)
    take(observations, state)
    (canary_jetson,) = (n for n in state.released if observations[n].profile == "jetson-cuda")
    observations[canary_jetson] = replace(observations[canary_jetson], serving=ServingCounters(100, 0, 40.0, 0.0))
    idle = [n for n, o in observations.items() if o.profile == "jetson-cuda" and n != canary_jetson]
    for node_id in idle:
        observations[node_id] = replace(observations[node_id], serving=None)
    state = step(step(state, observations, 1.0), observations, 61.0)
    latency = next(r for r in state.gate_results if r.gate.metric == "p95_latency_ratio")
    assert (state.status, state.wave, latency.verdict) == ("running", 0, "no_data")
    assert "waiting for the baseline nodes of jetson-cuda to serve 20 requests" in latency.detail
    offline = {n: replace(observations[n], online=False) for n in idle}  # they report nothing to wait for
    stale = {n: replace(o, serving=ServingCounters(3, 0, 4.0, 0.0)) for n, o in offline.items()}  # last reported
    latency = next(r for r in step(state, {**observations, **stale}, 62.0).gate_results if "p95" in r.gate.metric)
    assert "not compared: jetson-cuda" in latency.detail
    latency = next(r for r in step(state, {**observations, **offline}, 62.0).gate_results if "p95" in r.gate.metric)
    assert "not compared: jetson-cuda" in latency.detail
    for node_id in idle:
        observations[node_id] = replace(observations[node_id], serving=ServingCounters(100, 0, 4.0, 0.0))
    state = step(state, observations, 62.0)
    assert state.status == "paused"
    assert state.failed_gate is not None
    assert state.failed_gate.detail.startswith("jetson-cuda: canary p95 40 ms vs baseline 4 ms")


def test_quiet_canaries_hold_the_wave_until_its_deadline_then_fail_for_want_of_data() -> None:
    """Issue 17: a gate without data neither passes silently nor judges: by default it holds the wave, and fails
    it, saying why, once the wave's deadline (600 s here) has passed."""
    observations = fleet(10)
    state = step(rollout("2,100%"), observations, 0.0)
    take(observations, state, requests=3, p95=40.0)
    state = step(step(state, observations, 1.0), observations, 61.0)
    assert (state.status, state.wave) == ("running", 0)
    assert state.message.startswith(
        "wave 1: gate error_rate_delta<=0.01 waits for data until 10m after the wave started"
    )
    latency = next(r for r in state.gate_results if r.gate.metric == "p95_latency_ratio")
    assert (latency.value, latency.verdict, latency.passed) == (None, "no_data", False)
    take(observations, state, requests=3, p95=40.0)
    assert step(state, observations, 599.0).status == "running"
    failed = step(state, observations, 600.0)
    assert failed.status == "rolled_back"
    assert failed.failed_gate is not None
    assert failed.failed_gate.verdict == "fail_no_data"
    assert "not enough data by the wave's deadline" in failed.message

    # Traffic that arrives while the wave holds lets it be judged on data.
    take(observations, state, requests=300, p95=4.0)
    state = step(state, observations, 300.0)
    assert state.wave == 1
    assert {r.verdict for r in state.gate_results} == {"pass", "not_applicable"}  # drift: no reference

    # The operator may choose to let the wave go on: the result then says it was not judged.
    observations = fleet(10)
    state = step(rollout("2,100%", on_no_data="pass"), observations, 0.0)
    take(observations, state, requests=3, p95=40.0)
    state = step(step(state, observations, 1.0), observations, 61.0)
    assert state.wave == 1
    latency = next(r for r in state.gate_results if r.gate.metric == "p95_latency_ratio")
    assert (latency.value, latency.verdict, latency.passed) == (None, "pass_no_data", True)
    assert latency.detail.startswith("NOT JUDGED")


def test_kept_out_nodes_are_in_no_wave_and_come_back_when_nothing_keeps_them_out() -> None:
    observations = fleet(5)
    observations["n001"] = replace(observations["n001"], excluded="policy rule allowed_regions: us-east")
    state = step(rollout("100%"), observations, 0.0)
    assert state.nodes["n001"].state == "excluded"
    assert "n001" not in state.released
    assert len(state.released) == 4
    observations["n001"] = replace(observations["n001"], excluded=None)
    state = step(state, observations, 1.0)
    assert state.nodes["n001"].excluded is None
    assert "n001" in state.released  # it joins the last wave, which has started


def test_a_node_that_refuses_the_version_itself_is_kept_out_not_failed() -> None:
    observations = fleet(3)
    state = step(rollout("100%"), observations, 0.0)
    refused = Failure("digits", "2", None, "refused by placement policy", 1.0, kind="policy")
    observations["n002"] = replace(observations["n002"], failure=refused)
    state = step(state, observations, 1.0)
    assert state.nodes["n002"].state == "excluded"
    assert state.nodes["n002"].refused
    assert state.nodes["n002"].excluded == "the node refused it: refused by placement policy"
    assert state.status == "running"


@pytest.mark.parametrize(
    ("excluded", "refused"), [("the version was declined: no-variant", True), ("the node refused it: a pin", False)]
)
def test_a_node_that_refused_the_version_stays_out_whatever_its_exclusion_says(excluded: str, refused: bool) -> None:
    # The flag decides, not the words: reworded, a refusing node stays out; with the old words, a node only a pin
    # kept out comes back.
    observations = fleet(3)
    state = step(rollout("100%"), observations, 0.0)
    kept_out = replace(state.nodes["n002"], excluded=excluded, refused=refused)
    state = replace(state, nodes={**state.nodes, "n002": kept_out})
    state = step(state, observations, 1.0)  # nothing keeps it out now
    assert (state.nodes["n002"].state == "excluded") == refused
    assert ("n002" in state.released) != refused


def test_nodes_that_match_later_join_the_last_wave() -> None:
    observations = fleet(4)
    state = step(rollout("1,100%"), observations, 0.0)
    observations["n900"] = replace(node(900), node_id="n900")
    state = step(state, observations, 1.0)
    assert state.nodes["n900"].wave == 1  # "1,100%": the last wave is the second


def test_paused_rollouts_only_track_progress() -> None:
    observations = fleet(10)
    state = step(rollout("1,100%"), observations, 0.0)
    state = replace(state, status="paused")
    take(observations, state)
    actions = plan_rollout(state, observations, 500.0)
    state = apply_actions(state, actions)
    assert state.wave == 0
    assert len(state.released) == 1
    assert sum(a.healthy_at is not None for a in state.nodes.values()) == 1


@pytest.mark.parametrize(
    ("seed", "max_unavailable", "on_failure"),
    [(2, None, "rollback"), (6, 3, "pause"), (3, None, "pause"), (4, 5, "rollback")],
)
def test_naming_the_changed_nodes_gives_the_same_actions_as_looking_at_every_node(
    seed: int, max_unavailable: int | None, on_failure: str
) -> None:
    # The simulator passes `changed` so that a step costs what changed, not the fleet; the control plane does not.
    # Both must act alike, step by step, whatever the nodes do: report the version, fail, go offline, get kept
    # out and let in again, or match only after the rollout began.
    rng = random.Random(seed)
    observations = fleet(50)
    late = [node(i) for i in range(50, 60)]
    gates = (Gate("activation_success_rate", ">=", 0.6),)
    full = fast = rollout("4,30%,60%", max_unavailable=max_unavailable, on_failure=on_failure, gates=gates)
    changed: set[str] = set()
    for now in range(0, 6000, 30):
        for _ in range(rng.randrange(6)):
            if late and rng.random() < 0.05:
                joining = late.pop()
                observations[joining.node_id] = joining
                changed.add(joining.node_id)
                continue
            node_id = rng.choice(sorted(observations))
            current = observations[node_id]
            health = Failure("m", "2", "v", "golden outputs differ", now, 1, "health")
            probation = Failure("m", "2", "v", "p95 over its limit", now, 1, "probation")
            if node_id not in full.released:
                moves = [(3, replace(current, online=not current.online))]
                moves.append((1, replace(current, excluded=None if current.excluded else "policy rule regions: no")))
                moves.append((1, replace(current, version="2")))  # it runs the version already: healthy once released
            elif current.version != "2":
                moves = [
                    (12, replace(current, version="2", probation="running")),
                    (1, replace(current, failure=health)),
                ]
                moves.append((2, replace(current, online=not current.online)))
            else:
                moves = [
                    (16, replace(current, probation="passed")),
                    (1, replace(current, version="1", failure=probation)),
                ]
            observations[node_id] = rng.choices([m for _, m in moves], weights=[w for w, _ in moves])[0]
            changed.add(node_id)
        expected = plan_rollout(full, observations, float(now))
        actions = plan_rollout(fast, observations, float(now), None if now == 0 else changed)
        assert actions == expected, now
        # The control plane loads the rollout afresh at every step; the simulator keeps it, with its node index
        # patched from step to step.
        full, fast = replace(apply_actions(full, expected)), apply_actions(fast, actions)
        assert fast == full
        assert fast.released == full.released
        assert all(fast.members(w) == full.members(w) for w in range(len(fast.spec.waves)))
        assert next_due(fast, now + 30.0) == next_due(full, now + 30.0)
        changed = named_nodes(actions)


def test_a_node_unpinned_before_the_last_wave_waits_for_it_and_proves_healthy_again() -> None:
    # Healthy in wave 1, pinned back to 1, unpinned during wave 2: it joined wave 3 already released (the version
    # before its wave started) and 'healthy' (from before the pin) while it ran 1.
    observations = fleet(4)
    state = step(rollout("2,3,100%"), observations, 0.0)
    _, second = sorted(state.released)
    take(observations, state)
    state = step(state, observations, 1.0)
    assert state.nodes[second].state == "healthy"
    observations[second] = replace(observations[second], version="1", excluded="pinned to 1 (pin 4)")
    state = step(state, observations, 2.0)
    state = step(state, observations, 62.0)
    assert state.wave == 1
    observations[second] = replace(observations[second], excluded=None)
    state = step(state, observations, 63.0)
    unpinned = state.nodes[second]
    assert (unpinned.wave, unpinned.state) == (2, "pending")
    assert second not in state.released
    assert unpinned.ever_on_target  # it did run the version: rolled back, not unchanged, should the rollout be
    take(observations, state)
    state = step(state, observations, 64.0)
    state = step(state, observations, 130.0)  # wave 2 has baked: wave 3 starts, and releases it
    assert (state.wave, state.nodes[second].state) == (2, "updating")
    assert second in state.released


def test_a_node_pinned_after_its_release_no_longer_holds_its_wave_and_comes_back_when_unpinned() -> None:
    """It stayed 'updating', with no note, and held its wave until the deadline (the pin had sent it back)."""
    observations = fleet(3)
    state = step(rollout("2,100%"), observations, 0.0)
    first, second = sorted(state.released)
    take(observations, state)
    observations[second] = replace(observations[second], version="1", excluded="pinned to 1 (pin 4)")
    state = step(state, observations, 1.0)
    assert state.nodes[second].state == "excluded"
    assert state.nodes[second].excluded == "pinned to 1 (pin 4)"
    state = step(state, observations, 62.0)  # the other node has baked: the wave passes, long before its deadline
    assert state.wave == 1
    # unpinned: it joins the last wave, which has started
    observations[second] = replace(observations[second], excluded=None)
    state = step(state, observations, 63.0)
    assert state.nodes[second].excluded is None
    assert state.nodes[second].wave == 1
    assert second in state.released
    assert first not in {n for n, a in state.nodes.items() if a.excluded}


def test_an_online_node_that_never_finishes_its_update_counts_as_failed_at_twice_the_deadline() -> None:
    """Past the deadline an online node holds its wave; one whose update cannot finish while it polls on (a disk too
    small for the version) held it for ever. Two deadlines after its release it counts as failed, and the gates
    judge the wave; an offline node is not counted so (it stopped holding the wave at the deadline)."""
    observations = fleet(4)
    state = step(rollout("50%,100%"), observations, 0.0)
    first = sorted(n for n, a in state.nodes.items() if a.wave == 0)
    stuck, done = first
    observations[done] = replace(observations[done], version="2")
    state = step(state, observations, 10.0)
    state = step(state, observations, 1199.0)  # 2 x 600 s after the release, less a second
    assert state.status == "running"
    assert state.nodes[stuck].failed_at is None
    assert state.message.startswith("wave 1: 1 updating; past its deadline")
    state = step(state, observations, 1200.0)
    assert state.nodes[stuck].failure == "overdue: still updating 20m after its release"
    assert state.status == "rolled_back"  # 1 of 2 activated: activation_success_rate>=0.95 fails

    offline = fleet(4)
    state = step(rollout("50%,100%"), offline, 0.0)
    first = sorted(n for n, a in state.nodes.items() if a.wave == 0)
    offline[first[0]] = replace(offline[first[0]], online=False)
    offline[first[1]] = replace(offline[first[1]], version="2")
    state = step(state, offline, 10.0)
    state = step(state, offline, 5000.0)
    assert state.nodes[first[0]].failed_at is None
