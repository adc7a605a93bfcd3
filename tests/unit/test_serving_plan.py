"""How a node's cores and budgets are shared by its serving processes (strata.agent.processes), and how their
serving counts reach the agent's tracker: pure decisions, no processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.agent.config import AgentConfig
from strata.agent.processes import plan_serving, share
from strata.agent.serving import ServingTracker
from strata.core.errors import ConfigError


@pytest.mark.parametrize(
    ("tier", "cores", "processes", "threads", "expected"),
    [
        ("device", 4, None, None, (1, None)),  # a device keeps one process (its memory budget)
        ("near-edge", 8, None, None, (8, 1)),  # every core serves, one intra-op thread each
        ("cloud", 16, 4, None, (4, 4)),  # threads fill the cores the processes leave
        ("device", 4, 2, 2, (2, 2)),
        ("near-edge", 6, 4, None, (4, 1)),
    ],
)
def test_processes_and_threads_are_sized_together(
    tier: str, cores: int, processes: int | None, threads: int | None, expected: tuple[int, int | None]
) -> None:
    assert plan_serving(tier, cores, processes, threads) == expected


@pytest.mark.parametrize(("processes", "threads"), [(0, None), (None, 0), (3, 2), (None, 2), (5, None)])
def test_a_plan_that_cannot_work_is_refused(processes: int | None, threads: int | None) -> None:
    with pytest.raises(ConfigError):
        plan_serving("near-edge", 4, processes, threads)


def test_each_process_gets_its_share_of_the_budgets() -> None:
    config = AgentConfig(
        server="https://cp", data_dir=Path("/nonexistent"), name="n", tier="cloud", max_queue_size=256,
        max_connections=1000, request_budget_mb=128, max_request_mb=64,
    )  # fmt: skip
    limits, batching = share(config, 4)
    assert (limits.max_connections, batching.max_queue_size) == (250, 64)
    assert limits.max_body_bytes_in_flight == 64 << 20  # never below one largest request (128 / 4 = 32 MB)
    whole, alone = share(config, 1)
    assert (whole.max_connections, whole.max_body_bytes_in_flight, alone.max_queue_size) == (1000, 128 << 20, 256)


def test_a_serving_process_hands_its_counts_to_the_agent_once() -> None:
    worker, agent = ServingTracker(), ServingTracker()
    worker.record_success("m", "1", 2.0)
    worker.record_failure("m", "1", "internal")
    worker.record_failure("m", "1", "rejected")  # not the model's fault: not counted at all
    for taken in worker.take():
        agent.add(*taken)
    assert worker.take() == []  # taken once
    agent.record_success("m", "1", 4.0)
    counters = agent.counters("m", "1")
    assert counters is not None
    assert (counters.requests, counters.errors, counters.latency_p95_ms) == (3, 1, 4.0)
