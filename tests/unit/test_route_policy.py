"""The pure routing decisions: circuit breaker transitions, budget routing, and what an answer means."""

from __future__ import annotations

import pytest

from strata.core.errors import ConfigError
from strata.route.breaker import Breaker, BreakerConfig, BreakerState
from strata.route.route_plan import Attempt, TargetView, Verdict, classify, counts_against, next_attempt

CONFIG = BreakerConfig(failure_threshold=3, cooldown_s=5.0)


# --- the breaker -------------------------------------------------------------------------------------------


def test_a_closed_breaker_opens_after_the_threshold_of_failures_in_a_row() -> None:
    breaker = Breaker()
    for _ in range(2):
        breaker = breaker.failed(10.0, CONFIG)
        assert breaker.state is BreakerState.CLOSED
        assert breaker.allows(10.0, CONFIG)
    breaker = breaker.failed(11.0, CONFIG)
    assert (breaker.state, breaker.opened_at) == (BreakerState.OPEN, 11.0)
    assert not breaker.allows(15.9, CONFIG)
    assert breaker.allows(16.0, CONFIG)  # the cool-down is over: one trial may go


def test_a_success_forgets_earlier_failures() -> None:
    breaker = Breaker().failed(0, CONFIG).failed(0, CONFIG).succeeded()
    assert breaker.failed(0, CONFIG).state is BreakerState.CLOSED


def test_half_open_lets_one_probe_through_at_a_time() -> None:
    opened = Breaker(BreakerState.OPEN, 3, opened_at=0.0)
    probing = opened.attempt(6.0, CONFIG)
    assert (probing.state, probing.probing) == (BreakerState.HALF_OPEN, True)
    assert not probing.allows(6.0, CONFIG)
    assert probing.released().allows(6.0, CONFIG)  # a cancelled probe lets the next request try


def test_a_probe_that_succeeds_closes_and_one_that_fails_reopens_for_another_cool_down() -> None:
    probing = Breaker(BreakerState.OPEN, 3, opened_at=0.0).attempt(6.0, CONFIG)
    assert probing.succeeded() == Breaker()
    reopened = probing.failed(7.0, CONFIG)
    assert (reopened.state, reopened.opened_at) == (BreakerState.OPEN, 7.0)
    assert not reopened.allows(11.0, CONFIG)
    assert reopened.allows(12.0, CONFIG)


def test_a_late_failure_does_not_extend_an_open_breaker() -> None:
    opened = Breaker(BreakerState.OPEN, 3, opened_at=1.0)
    assert opened.failed(4.0, CONFIG).opened_at == 1.0


def test_an_attempt_on_a_closed_breaker_changes_nothing() -> None:
    assert Breaker().attempt(0, CONFIG) == Breaker()


def test_breaker_settings_out_of_range_are_refused() -> None:
    with pytest.raises(ConfigError):
        BreakerConfig(failure_threshold=0)
    with pytest.raises(ConfigError):
        BreakerConfig(cooldown_s=0)


# --- where a request goes ------------------------------------------------------------------------------------


def view(breaker: Breaker | None = None, ready: bool | None = None, latency_s: float | None = None) -> TargetView:
    return TargetView(breaker or Breaker(), ready, latency_s)


LOCAL, PARENT, CLOUD = 0, 1, 2


def test_without_a_budget_targets_are_tried_in_tier_order_with_the_full_timeout() -> None:
    targets = [view(), view(), view()]
    assert next_attempt(targets, frozenset(), 0, None, 10.0, CONFIG) == Attempt(LOCAL, 10.0)
    assert next_attempt(targets, frozenset({LOCAL}), 0, None, 10.0, CONFIG) == Attempt(PARENT, 10.0)
    assert next_attempt(targets, frozenset({LOCAL, PARENT}), 0, None, 10.0, CONFIG) == Attempt(CLOUD, 10.0)
    assert next_attempt(targets, frozenset({LOCAL, PARENT, CLOUD}), 0, None, 10.0, CONFIG) is None


def test_an_open_breaker_or_a_failed_probe_skips_a_target() -> None:
    opened = Breaker(BreakerState.OPEN, 3, opened_at=0.0)
    targets = [view(breaker=opened), view(ready=False), view(ready=True)]
    assert next_attempt(targets, frozenset(), 1.0, None, 10.0, CONFIG) == Attempt(CLOUD, 10.0)


def test_when_nothing_viable_is_left_the_untried_targets_go_as_a_last_resort() -> None:
    opened = Breaker(BreakerState.OPEN, 3, opened_at=0.0)
    targets = [view(breaker=opened), view(ready=False), view()]
    decision = next_attempt(targets, frozenset({CLOUD}), 1.0, None, 10.0, CONFIG)
    assert decision == Attempt(LOCAL, 10.0, last_resort=True)


def test_the_budget_keeps_time_for_the_next_tier() -> None:
    targets = [view(), view(ready=False), view(latency_s=0.1)]
    # local's answer may take 0.5 s - 1.5 x 0.1 s: then there is still time for the cloud's usual answer
    decision = next_attempt(targets, frozenset(), 0.0, 0.5, 10.0, CONFIG)
    assert decision is not None
    assert decision.index == LOCAL
    assert decision.timeout_s == pytest.approx(0.35)


def test_a_target_usually_slower_than_the_time_left_is_passed_over() -> None:
    targets = [view(latency_s=0.3), view(latency_s=0.01), view(latency_s=0.05)]
    decision = next_attempt(targets, frozenset(), 0.0, 0.2, 10.0, CONFIG)
    assert decision is not None
    assert decision.index == PARENT


def test_waiting_that_would_leave_the_next_tier_no_time_goes_there_at_once() -> None:
    targets = [view(), view(ready=False), view(latency_s=0.08)]
    decision = next_attempt(targets, frozenset(), 0.0, 0.1, 10.0, CONFIG)  # 0.1 s left; the cloud needs 0.12 s
    assert decision == Attempt(CLOUD, pytest.approx(0.1))


def test_the_last_viable_target_gets_all_the_time_left_up_to_the_timeout() -> None:
    targets = [view(), view(), view(latency_s=0.5)]
    decision = next_attempt(targets, frozenset({LOCAL, PARENT}), 0.0, 0.2, 10.0, CONFIG)
    assert decision == Attempt(CLOUD, pytest.approx(0.2))
    capped = next_attempt(targets, frozenset({LOCAL, PARENT}), 0.0, 30.0, 10.0, CONFIG)
    assert capped == Attempt(CLOUD, 10.0)


def test_no_attempt_once_the_budget_is_spent() -> None:
    assert next_attempt([view()], frozenset(), 5.0, 5.001, 10.0, CONFIG) is None


# --- what an answer means ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.ANSWERED),
        (204, Verdict.ANSWERED),
        (429, Verdict.REFUSED),
        (503, Verdict.REFUSED),
        (404, Verdict.MISSING),
        (400, Verdict.CALLER_ERROR),
        (401, Verdict.CALLER_ERROR),
        (413, Verdict.CALLER_ERROR),
        (500, Verdict.FAILED),
        (502, Verdict.FAILED),
        (504, Verdict.FAILED),
        (None, Verdict.FAILED),
        (302, Verdict.FAILED),
    ],
)
def test_classify(status: int | None, verdict: Verdict) -> None:
    assert classify(status) is verdict


def test_only_failures_count_against_a_target() -> None:
    assert [v for v in Verdict if counts_against(v)] == [Verdict.FAILED]
