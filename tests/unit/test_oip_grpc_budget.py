"""How the gRPC listener sizes and shares its request budget (strata.agent.oip_grpc.MessageBudget, and the
settings in strata.agent.config): pure bookkeeping on an event loop, no server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from strata.agent.config import AgentConfig
from strata.agent.oip_grpc import MessageBudget, inference_slots
from strata.core.errors import ConfigError

MIB = 1 << 20


def config(**limits: Any) -> AgentConfig:
    return AgentConfig(server="https://cp", data_dir=Path("/nonexistent"), name="n", tier="near-edge", **limits)


@pytest.mark.parametrize(
    ("limits", "megabytes"),
    [
        ({}, 4),  # gRPC's own default: 31 inferences read at once in 128 MiB, one message's worth kept
        ({"max_request_mb": 2}, 2),  # never past the largest REST body
        ({"max_request_mb": 6, "request_budget_mb": 6}, 3),  # half the budget, so inference has room for one
        ({"grpc_max_message_mb": 16}, 16),
    ],
)
def test_the_largest_grpc_message_defaults_to_grpcs_own_within_the_limits(
    limits: dict[str, Any], megabytes: float
) -> None:
    assert config(**limits).grpc_max_message_bytes == megabytes * MIB


@pytest.mark.parametrize(
    "limits",
    [
        {"grpc_max_message_mb": 0},
        {"grpc_max_message_mb": 65},  # past --max-request-mb
        {"grpc_max_message_mb": 64, "request_budget_mb": 100},  # past half the budget: no room for inference
    ],
)
def test_a_grpc_message_limit_that_cannot_work_is_refused(limits: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="--grpc-max-message-mb must be"):
        config(**limits)


@pytest.mark.parametrize(
    ("limits", "flag"),
    [
        ({"max_request_mb": float("nan")}, "--max-request-mb"),
        ({"request_budget_mb": float("nan")}, "--request-budget-mb"),
        ({"request_budget_mb": float("inf")}, "--request-budget-mb"),
        ({"grpc_max_message_mb": float("inf"), "max_request_mb": 1e300, "request_budget_mb": 1e300}, "--grpc-max"),
        ({"relay_cache_mb": float("inf")}, "--relay-cache-mb"),
    ],
)
def test_a_size_that_is_no_number_is_refused_not_a_traceback_at_start(limits: dict[str, Any], flag: str) -> None:
    # NaN passed every check (each comparison is false) and the agent died at start in int(nan), a traceback
    with pytest.raises(ConfigError, match=f"{flag}.* must be a finite number"):
        config(**limits)


@pytest.mark.parametrize(("rpcs", "slots"), [(1, 1), (2, 1), (8, 4), (40, 36), (1024, 1020)])
def test_inference_leaves_a_few_rpc_slots_to_the_other_calls(rpcs: int, slots: int) -> None:
    # as many as OTHER_RPC_SLOTS, at most half: a port of one RPC still serves inference
    assert inference_slots(rpcs) == slots


def test_inference_leaves_the_reserve_to_health_calls_which_never_wait_behind_it() -> None:
    async def scenario() -> list[str]:
        budget = MessageBudget(total_bytes=4 * MIB, reserve_bytes=MIB)
        order: list[str] = []

        async def call(name: str, reserved: bool) -> None:
            await budget.charge(MIB, reserved=reserved)
            order.append(name)

        for i in range(3):  # the inferences that fit: all but the reserve
            await call(f"infer{i}", reserved=False)
        waiting = asyncio.create_task(call("infer3", reserved=False))
        await asyncio.sleep(0)
        assert not waiting.done()  # the reserve is not inference's
        await call("live", reserved=True)  # a health call uses it at once
        assert budget.used_bytes == 4 * MIB
        blocked = asyncio.create_task(call("ready", reserved=True))
        await asyncio.sleep(0)
        budget.release(MIB)  # the health call is answered: the next health call goes first, not the inference
        await asyncio.sleep(0)
        assert blocked.done()
        assert not waiting.done()
        budget.release(2 * MIB)
        await asyncio.wait_for(waiting, 1)
        cancelled = asyncio.create_task(budget.charge(3 * MIB, reserved=True))
        await asyncio.sleep(0)
        cancelled.cancel()  # given up while waiting: nothing was charged
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert budget.used_bytes == 3 * MIB
        return order

    assert asyncio.run(scenario()) == ["infer0", "infer1", "infer2", "live", "ready", "infer3"]


def test_a_budget_without_room_beside_its_reserve_is_refused() -> None:
    with pytest.raises(ValueError, match="does not leave room"):
        MessageBudget(total_bytes=MIB, reserve_bytes=MIB)


def test_a_requests_parse_costs_its_raw_tensors_at_their_size_and_every_other_byte_more() -> None:
    """`parse_cost`, read off the wire: raw_input_contents (field 7) become bytes of their size; everything else may
    expand PARSE_EXPANSION times; a message whose top-level fields cannot be read costs all of it expanded."""
    from strata.agent.oip_grpc import PARSE_EXPANSION, SCAN_FIELDS, parse_cost
    from strata.agent.oip_grpc_codec import message_class

    request = message_class("ModelInferRequest")(model_name="digits")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(bytes(4 * 64 * 1000))
    data = request.SerializeToString()
    raw = len(request.raw_input_contents[0])
    assert parse_cost(data) == raw + (len(data) - raw) * PARSE_EXPANSION
    empties = b"\x2a\x00" * 1000  # 1,000 empty inputs: all of it may expand
    assert parse_cost(empties) == len(empties) * PARSE_EXPANSION
    broken = b"\x3a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # field 7 with a length longer than a varint may be
    assert parse_cost(broken) == len(broken) * PARSE_EXPANSION
    # a raw tensor claiming more bytes than the message holds (after an input that expands) counts for nothing
    lying = b"\x2a\x08" + b"\x2a\x00" * 4 + b"\x3a\x80\x80\x80\x02"
    assert parse_cost(lying) == len(lying) * PARSE_EXPANSION
    # past SCAN_FIELDS top-level fields the scan stops: a raw tensor after them is charged as if it expanded
    late = b"\x2a\x00" * SCAN_FIELDS + b"\x3a\x04abcd"
    assert parse_cost(late) == len(late) * PARSE_EXPANSION
