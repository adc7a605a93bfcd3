"""A warning that repeats in a flood is logged once per interval for each kind (`strata.core.logformat.Quieted`)."""

from __future__ import annotations

from strata.core.logformat import Quieted


def test_a_kind_is_due_at_first_then_once_its_interval_has_passed() -> None:
    quieted = Quieted(60.0)
    assert quieted.due("refused", 1000.0)
    assert not quieted.due("refused", 1000.5)
    assert not quieted.due("refused", 1059.9)
    assert quieted.due("accept", 1059.9)  # each kind has its own interval
    assert quieted.due("refused", 1060.0)
    assert not quieted.due("refused", 1100.0)  # counted from the last time it was due, not the first ask
    assert quieted.due("refused", 1120.0)
