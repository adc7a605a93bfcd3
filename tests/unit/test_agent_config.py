"""The agent's settings that `strata agent` checks before it starts the agent process."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.agent.config import AgentConfig
from strata.core.errors import ConfigError


@pytest.mark.parametrize("seconds", [0.0, 0.5, 601.0])
def test_a_request_timeout_outside_one_second_to_ten_minutes_is_refused(seconds: float, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--request-timeout must be between 1s and 10m"):
        AgentConfig("https://s", tmp_path, "n", "device", request_timeout_s=seconds)
    assert AgentConfig("https://s", tmp_path, "n", "device", request_timeout_s=3.0).request_timeout_s == 3.0


def test_the_serving_event_loop_is_asyncios_on_devices_and_uvloops_elsewhere_unless_chosen(tmp_path: Path) -> None:
    def loop(tier: str, chosen: str | None = None) -> str:
        return AgentConfig("https://s", tmp_path, "n", tier, event_loop=chosen).serving_loop

    assert [loop(tier) for tier in ("device", "near-edge", "cloud")] == ["asyncio", "uvloop", "uvloop"]
    assert loop("device", "uvloop") == "uvloop"
    assert loop("near-edge", "asyncio") == "asyncio"
    with pytest.raises(ConfigError, match="--event-loop must be one of uvloop, asyncio, got 'trio'"):
        loop("device", "trio")
    config = AgentConfig("https://s", tmp_path, "n", "device", event_loop="uvloop")
    assert AgentConfig.from_json(config.to_json()).serving_loop == "uvloop"  # as the serving processes read it
