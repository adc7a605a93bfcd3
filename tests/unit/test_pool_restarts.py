"""When the agent starts a serving process again after it ended (`strata.agent.pool.restart_delay`)."""

from __future__ import annotations

from strata.agent.pool import RESTART_DELAY_MAX_S, RESTART_DELAY_S, STABLE_S, restart_delay


def test_a_process_that_keeps_dying_is_started_less_and_less_often_and_one_that_served_at_once() -> None:
    delays = [restart_delay(None, 0.5)]
    for _ in range(8):  # dies again a moment after each start, or does not start at all
        delays.append(restart_delay(delays[-1], None if len(delays) % 2 else 2.0))
    assert delays == [RESTART_DELAY_S, 2, 4, 8, 16, 32, RESTART_DELAY_MAX_S, RESTART_DELAY_MAX_S, RESTART_DELAY_MAX_S]
    assert restart_delay(RESTART_DELAY_MAX_S, STABLE_S) == RESTART_DELAY_S  # it served a while: a fresh start
    assert restart_delay(None, 3600.0) == RESTART_DELAY_S
