"""The floor rate a parent relay's answer must keep (`strata.agent.transport.rate_allowance`): the decision behind
cutting a parent that trickles bytes (tests/security/test_parent_relay.py attacks it with real processes)."""

from __future__ import annotations

from strata.agent.transport import rate_allowance


def test_a_parent_must_keep_its_answer_coming_at_the_floor_rate_after_the_timeout() -> None:
    assert rate_allowance(started=100.0, timeout=30.0, received=0, min_rate=16384, now=110.0) == 20.0  # the timeout
    assert rate_allowance(started=100.0, timeout=30.0, received=0, min_rate=16384, now=131.0) < 0  # nothing came
    # each 16 KiB received buys a second past the timeout
    assert rate_allowance(started=100.0, timeout=30.0, received=10 * 16384, min_rate=16384, now=135.0) == 5.0
