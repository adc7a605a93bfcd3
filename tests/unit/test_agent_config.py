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
