"""The pure batching decisions: batch formation, admission, and how a model's batching is configured."""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import pytest

from strata.agent.batch_plan import (
    BatchingConfig,
    Cut,
    QueueLoad,
    Shed,
    WaitUntil,
    admit,
    batchable_signature,
    cost_follows_rows,
    estimate_wait_s,
    ewma,
    plan_batch,
    policy_overrides,
    resolve_config,
    runs_inline,
)
from strata.agent.config import AgentConfig
from strata.core.errors import ConfigError
from strata.core.package import TensorSpec

MS = 1_000_000  # ns


@dataclass(frozen=True)
class Item:
    rows: int
    key: Hashable | None = "a"
    enqueued_ns: int = 0


def config(**changes: object) -> BatchingConfig:
    return BatchingConfig(**changes)


# --- batch formation -------------------------------------------------------------------------------------


def test_an_empty_queue_plans_nothing() -> None:
    assert plan_batch([], 0, config()) is None


def test_with_no_delay_everything_of_the_head_key_goes_at_once() -> None:
    queue = [Item(1), Item(2), Item(1, key="b"), Item(3)]
    assert plan_batch(queue, 0, config(max_batch_size=32)) == Cut((0, 1, 3), 6)


def test_the_oldest_request_always_goes_first_even_when_others_are_more_numerous() -> None:
    queue = [Item(1, key="rare"), Item(1, key="b"), Item(1, key="b"), Item(1, key="b")]
    assert plan_batch(queue, 0, config()) == Cut((0,), 1)


def test_a_full_batch_goes_at_once_even_before_the_delay() -> None:
    queue = [Item(3, enqueued_ns=0), Item(3), Item(2), Item(5)]
    decision = plan_batch(queue, 1, config(max_batch_size=8, max_queue_delay_us=10_000))
    assert decision == Cut((0, 1, 2), 8)


def test_a_request_that_would_overflow_the_batch_closes_it() -> None:
    queue = [Item(3), Item(3), Item(4), Item(1)]
    decision = plan_batch(queue, 1, config(max_batch_size=8, max_queue_delay_us=10_000))
    assert decision == Cut((0, 1), 6)  # FIFO within a key: the 1-row request behind the 4 does not jump it


def test_a_partial_batch_waits_for_the_oldest_requests_deadline() -> None:
    queue = [Item(1, enqueued_ns=5 * MS), Item(1, enqueued_ns=6 * MS)]
    settings = config(max_batch_size=8, max_queue_delay_us=2_000)
    assert plan_batch(queue, 6 * MS, settings) == WaitUntil(7 * MS)
    assert plan_batch(queue, 7 * MS, settings) == Cut((0, 1), 2)
    assert plan_batch(queue, 9 * MS, settings) == Cut((0, 1), 2)


def test_reaching_the_largest_preferred_size_goes_at_once_and_cuts_there() -> None:
    settings = config(max_batch_size=16, max_queue_delay_us=10_000, preferred_batch_sizes=(4, 8))
    assert plan_batch([Item(2)] * 5, 0, settings) == Cut((0, 1, 2, 3), 8)
    # 4 is preferred, but 8 may still form within the delay: wait for it
    assert plan_batch([Item(2)] * 2, 0, settings) == WaitUntil(10_000_000)


def test_at_the_deadline_a_batch_is_cut_at_the_largest_preferred_size_it_reaches() -> None:
    settings = config(max_batch_size=16, max_queue_delay_us=1_000, preferred_batch_sizes=(4, 8))
    assert plan_batch([Item(1)] * 6, 2 * MS, settings) == Cut((0, 1, 2, 3), 4)
    # no preferred size reached exactly: the largest batch there is
    assert plan_batch([Item(3)] * 2, 2 * MS, settings) == Cut((0, 1), 6)


def test_requests_that_cannot_share_run_alone() -> None:
    queue = [Item(1, key=None), Item(1, key=None)]
    assert plan_batch(queue, 0, config()) == Cut((0,), 1)
    assert plan_batch([Item(1), Item(1)], 0, config(max_batch_size=1)) == Cut((0,), 1)


def test_a_request_larger_than_the_batch_runs_alone() -> None:
    assert plan_batch([Item(100), Item(1)], 0, config(max_batch_size=32)) == Cut((0,), 100)


# --- admission -------------------------------------------------------------------------------------------


def test_a_request_is_admitted_while_the_queue_has_room_and_no_measure_exists() -> None:
    assert admit(QueueLoad(0, 0, 0.0, None), config()) is None
    assert admit(QueueLoad(255, 255, 0.0, None), config(max_queue_size=256)) is None


def test_a_full_queue_sheds_with_retry_after_from_the_drain_time() -> None:
    shed = admit(QueueLoad(4, 40, 0.5, rows_per_s=10.0), config(max_queue_size=4, max_queue_wait_ms=None, instances=1))
    assert isinstance(shed, Shed)
    assert "queue is full" in shed.reason
    assert shed.retry_after_s == 5  # 0.5 s until a worker frees + 40 rows at 10 rows/s = 4.5 s -> 5


def test_a_wait_over_the_bound_sheds_before_the_queue_is_full() -> None:
    settings = config(max_queue_size=1000, max_queue_wait_ms=100.0, instances=1)
    assert admit(QueueLoad(3, 3, 0.02, rows_per_s=100.0), settings) is None  # 20 + 30 ms
    shed = admit(QueueLoad(9, 9, 0.02, rows_per_s=100.0), settings)  # 20 + 90 ms
    assert isinstance(shed, Shed)
    assert "110 ms exceeds 100 ms" in shed.reason
    assert shed.retry_after_s == 1  # at least one second: HTTP's unit


def test_instances_drain_the_queue_together() -> None:
    load = QueueLoad(10, 10, 0.0, rows_per_s=10.0)
    assert estimate_wait_s(load, instances=1) == pytest.approx(1.0)
    assert estimate_wait_s(load, instances=2) == pytest.approx(0.5)
    assert estimate_wait_s(QueueLoad(10, 10, 0.0, None), instances=1) is None


def test_ewma_starts_at_the_first_sample_and_moves_a_fifth_of_the_way() -> None:
    assert ewma(None, 10.0) == 10.0
    assert ewma(10.0, 20.0) == pytest.approx(12.0)


# --- configuration ---------------------------------------------------------------------------------------


def test_settings_out_of_range_are_refused() -> None:
    for bad in (
        {"max_batch_size": 0},
        {"max_queue_delay_us": -1},
        {"max_queue_size": 0},
        {"max_queue_wait_ms": 0.0},
        {"instances": 0},
        {"max_batch_size": 8, "preferred_batch_sizes": (16,)},
    ):
        with pytest.raises(ConfigError):
            config(**bad)


def spec(name: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, "FP32", tuple(shape))


def test_a_signature_is_batchable_when_every_tensor_has_a_dynamic_first_axis() -> None:
    assert batchable_signature([spec("x", -1, 64)], [spec("label", -1), spec("p", -1, 10)])
    assert not batchable_signature([spec("x", -1, 64), spec("scale", 1)], [spec("y", -1)])
    assert not batchable_signature([spec("x", -1, 64)], [spec("total", 1)])
    assert not batchable_signature([spec("x", 4, 64)], [spec("y", -1)])
    assert not batchable_signature([spec("scalar")], [spec("y", -1)])


def test_the_package_policy_overrides_the_agent_settings() -> None:
    policy = {"batching": {"max_batch_size": 8, "preferred_batch_sizes": [4, 8], "max_queue_wait_ms": None}}
    resolved = resolve_config(config(), policy, signature_batchable=True, rows_independent=True)
    assert resolved == config(max_batch_size=8, preferred_batch_sizes=(4, 8), max_queue_wait_ms=None)


def test_batching_is_off_for_a_signature_that_cannot_be_split() -> None:
    policy = {"batching": {"max_batch_size": 8, "max_queue_size": 7}}
    resolved = resolve_config(config(), policy, signature_batchable=False, rows_independent=True)
    assert not resolved.batching
    assert resolved.max_queue_size == 7  # the queue stays bounded


def test_a_model_that_mixes_rows_is_batched_only_when_its_package_asks() -> None:
    assert not resolve_config(config(), {}, signature_batchable=True, rows_independent=False).batching
    asks = {"batching": {"max_batch_size": 16}}
    assert resolve_config(config(), asks, signature_batchable=True, rows_independent=False).max_batch_size == 16


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ("yes", "must be an object"),
        ({"max_batch": 8}, "not a batching setting"),
        ({"max_batch_size": "8"}, "must be an integer"),
        ({"max_batch_size": True}, "must be an integer"),
        ({"preferred_batch_sizes": [4, 8.5]}, "list of integers"),
        ({"max_queue_wait_ms": "soon"}, "number or null"),
    ],
)
def test_a_malformed_policy_is_refused(section: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        policy_overrides({"batching": section})


def test_a_policy_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_batch_size must be at least 1"):
        resolve_config(config(), {"batching": {"max_batch_size": 0}}, signature_batchable=True, rows_independent=True)


# --- the agent's options ----------------------------------------------------------------------------------


def test_the_agent_configuration_carries_its_batching_settings_to_the_agent_process(tmp_path: Path) -> None:
    config = AgentConfig(
        server="https://127.0.0.1:8700",
        data_dir=tmp_path,
        name="edge-1",
        tier="near-edge",
        max_batch_size=16,
        max_queue_delay_us=500,
        preferred_batch_sizes=(8, 16),
        max_queue_size=64,
        max_queue_wait_ms=None,
        model_instances=2,
    )
    again = AgentConfig.from_json(json.loads(config.to_env()))
    assert again == config
    assert again.batching == BatchingConfig(16, 500, (8, 16), 64, None, 2)


def test_agent_batching_options_out_of_range_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preferred batch size 64"):
        AgentConfig("https://s", tmp_path, "n", "device", max_batch_size=32, preferred_batch_sizes=(64,))


def test_only_a_model_measured_small_runs_its_batches_on_the_loop() -> None:
    us = 1000
    assert not runs_inline(4, None, None, None)  # not measured yet: the first batches go to the workers
    assert runs_inline(4, 10 * us, 40 * us, 45 * us)
    assert not runs_inline(32, 10 * us, 40 * us, 45 * us)  # this batch would cost 320 µs
    assert not runs_inline(1, 10 * us, 300 * us, 300 * us)  # the last batch was slow
    assert not runs_inline(1, 10 * us, 40 * us, 50_000 * us)  # the last call waited (a lock, a device): not CPU


def test_only_a_model_whose_rows_say_what_a_batch_costs_may_run_on_the_loop() -> None:
    assert cost_follows_rows([TensorSpec("x", "FP32", (-1, 64))])  # digits: a row is 64 floats
    assert cost_follows_rows([TensorSpec("x", "FP32", (8, 3))])
    # another dynamic axis (a sequence, an image side) or strings: one request's rows may be as large as its body
    assert not cost_follows_rows([TensorSpec("ids", "INT64", (-1, -1)), TensorSpec("mask", "INT64", (-1, 128))])
    assert not cost_follows_rows([TensorSpec("image", "FP32", (-1, 3, -1, -1))])
    assert not cost_follows_rows([TensorSpec("text", "BYTES", (-1, 1))])
