"""A stop in the middle of the agent's start-up: the models it loads before serving (apart from test_crash.py, so
that a worker runs these beside its kills: tests are spread over workers by file)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_helpers import assert_consistent, build_slow_model, hold, push_model, stop_held

from strata.localfleet import LocalFleet

pytestmark = pytest.mark.slow


def test_an_agent_stopped_while_it_loads_its_version_at_start_up_serves_it_at_the_next_start(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    """SIGTERM (a service manager's stop or restart) while a restarted agent loads the only version it serves: it lets
    the load finish, stops with status 0 without serving, and leaves no loading record; the next start serves that
    version, without its control plane and with no failure. The stop used to cut the load (Python's default SIGINT,
    or no handler yet for SIGTERM), and the next start took it for a load the agent died in: the node's only version
    dropped as a failure, its package deleted, nothing served until the control plane sent it again."""
    x = {"X": np.zeros((1, 64), np.float32)}
    heavy = tmp_path / "heavy.onnx"
    build_slow_model(heavy)  # a golden check of a few seconds on this machine
    push_model(fleet, heavy, "1", tmp_path, sample=x)
    handle = fleet.start_agent("edge")
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    assert handle.process.stop() == 0
    fleet.stop_server()  # from here the node has only what it holds

    restarted = fleet.start_agent("edge")
    state_path = handle.data_dir / "state.json"

    def loading_at_start_up() -> bool:
        with contextlib.suppress(FileNotFoundError, ValueError):
            return bool(json.loads(state_path.read_text()).get("loading", {}).get("startup"))
        return False

    fleet.wait_for(loading_at_start_up, 60, "the start-up load", restarted.process, interval=0.002)
    hold(restarted.process, loading_at_start_up, "in its start-up load")
    assert stop_held(restarted.process, timeout=60) == 0
    log = restarted.process.log_path.read_text()
    assert "stopped by signal 15 while loading its models at start-up" in log
    assert "serving the Open Inference Protocol" not in log[log.rfind("agent stopped") + 1 :]
    state = json.loads(state_path.read_text())
    assert "loading" not in state
    assert not state.get("failures")

    again = fleet.start_agent("edge")

    def answered() -> bool:
        with contextlib.suppress(httpx.HTTPError):
            body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
            return httpx.post(f"{again.serve_url}/v2/models/digits/infer", json=body, timeout=10).status_code == 200
        return False

    fleet.wait_for(answered, 60, "version 1 served without the control plane", again.process)
    state = json.loads(state_path.read_text())
    assert state["models"]["digits"]["active"]["version"] == "1"
    assert not state.get("failures")
    assert_consistent(fleet, "edge")
