"""The per-node budget for what status reports record (`strata.control.quota.RecordBudget`)."""

from __future__ import annotations

from strata.control.quota import RecordBudget


def test_a_node_records_its_capacity_at_once_then_at_the_refill_rate_and_nodes_do_not_share() -> None:
    budget = RecordBudget(capacity=10, per_s=0.5)
    assert budget.take("n1", 8, now=0.0) == 8
    assert budget.take("n1", 8, now=0.0) == 2  # the rest of the bucket
    assert budget.take("n1", 1, now=1.0) == 0  # half a record refilled
    assert budget.take("n1", 5, now=5.0) == 2  # 2.5 in the bucket by now: whole records only
    assert budget.take("n2", 10, now=5.0) == 10  # another node has its own bucket
    assert budget.take("n1", 100, now=1000.0) == 10  # the refill stops at the capacity
    assert budget.take("n1", 0, now=1000.0) == 0
