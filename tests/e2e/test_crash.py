"""kill -9 at the worst moments: mid-download, mid-activation, and at random instants."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_helpers import push_model

from strata.agent.store import ArtifactStore
from strata.agent.vault import Vault
from strata.core.package import build_package, pack_tar
from strata.localfleet import LocalFleet

pytestmark = pytest.mark.slow


def _active_version(fleet: LocalFleet, name: str, model: str = "digits") -> str | None:
    path = fleet.agents[name].data_dir / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    slots = state["models"].get(model)
    return slots["active"]["version"] if slots else None


def _assert_consistent(fleet: LocalFleet, name: str) -> None:
    """Every package the agent kept verifies (decrypted with the node's key, as the agent reads them), and every
    slot points at one of them."""
    data_dir = fleet.agents[name].data_dir
    packages = data_dir / "packages"
    vault = Vault(data_dir / "trust")
    try:
        store = ArtifactStore(data_dir, vault)
        for folder in packages.iterdir():
            if not folder.name.startswith("."):
                _, files = store.open("sha256:" + folder.name)
                assert files is not None  # sealed at rest: decrypted and hash-checked in memory
    finally:
        vault.close()
    state = json.loads((data_dir / "state.json").read_text()) if (data_dir / "state.json").exists() else {}
    for slots in state.get("models", {}).values():
        assert (packages / slots["active"]["digest"].split(":")[1]).is_dir()


def test_kill_during_download_resumes_where_it_stopped(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> None:
    package = push_model(fleet, digits_onnx, "1", tmp_path)
    total = package.manifest.file("model.onnx").size
    rate = max(total // 4, 4096)  # about four seconds for the whole package
    handle = fleet.start_agent("slow", extra_args=["--max-download-rate", str(rate)])
    fleet.wait_for(lambda: "slow" in fleet.nodes(), 30, "enrollment", handle.process)
    fleet.client.deploy("digits", "1", {})
    downloads = handle.data_dir / "downloads" / "pieces"

    def partial() -> int:
        parts = list(downloads.glob("*.part")) if downloads.exists() else []
        return parts[0].stat().st_size if parts else 0

    fleet.wait_for(lambda: partial() > rate // 2, 30, "a partial download", handle.process)
    handle.process.kill()
    have = partial()
    assert 0 < have < total

    fleet.restart_agent("slow")
    fleet.wait_for_versions({"slow": {"digits": "1"}})
    log = fleet.agents["slow"].process.log_path.read_text()
    resumed = [line for line in log.splitlines() if "resumed at byte" in line]
    assert resumed, log[-2000:]
    assert int(resumed[-1].rsplit(" ", 1)[1]) >= have
    _assert_consistent(fleet, "slow")


def test_kill_during_activation_comes_back_serving_a_verified_model(
    fleet: LocalFleet, minilm_dir: Path, tmp_path: Path
) -> None:
    """MiniLM (90 MB) takes long enough to stage and load that the kill lands between staging and the switch."""
    tars = []
    for version in ("1", "2"):
        package = build_package(minilm_dir / "model.onnx", tmp_path / f"m{version}", name="minilm", version=version)
        tar = tmp_path / f"minilm-{version}.tar"
        pack_tar(package, tar)
        fleet.client.push_package(tar)
        tars.append(package)
    handle = fleet.start_agent("edge")
    fleet.client.deploy("minilm", "1", {})
    fleet.wait_for_versions({"edge": {"minilm": "1"}}, timeout=120)

    v2_dir = handle.data_dir / "packages" / tars[1].digest.split(":")[1]
    fleet.client.deploy("minilm", "2", {})
    fleet.wait_for(v2_dir.is_dir, 60, "v2 to be staged", handle.process, interval=0.005)
    handle.process.kill()
    assert _active_version(fleet, "edge", "minilm") == "1", "the kill should land before the switch"
    _assert_consistent(fleet, "edge")

    restarted = fleet.restart_agent("edge")
    fleet.wait_for(lambda: fleet.agent_live("edge"), 60, "the agent to serve", restarted.process)
    response = httpx.get(f"{restarted.serve_url}/v2/models/minilm", timeout=10)
    assert response.status_code == 200
    assert response.json()["versions"] in (["1"], ["2"])
    fleet.wait_for_versions({"edge": {"minilm": "2"}}, timeout=120)
    _assert_consistent(fleet, "edge")


def test_kill_at_random_instants_never_leaves_a_partial_model(
    fleet: LocalFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    push_model(fleet, digits_onnx, "1", tmp_path)
    push_model(fleet, digits_onnx_v2, "2", tmp_path)
    fleet.start_agent("edge")
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    x = np.zeros((1, 64), np.float32)
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
    rng = random.Random(7)
    target = "2"
    for round_number in range(6):
        fleet.client.deploy("digits", target, {})
        time.sleep(rng.uniform(0.0, 1.5))
        fleet.agents["edge"].process.kill()
        _assert_consistent(fleet, "edge")
        handle = fleet.restart_agent("edge")
        fleet.wait_for(lambda: fleet.agent_live("edge"), 30, "the agent to serve", handle.process)
        answer = httpx.post(f"{handle.serve_url}/v2/models/digits/infer", json=body, timeout=10)
        assert answer.status_code == 200, (round_number, answer.text)
        assert answer.json()["model_version"] in ("1", "2")
        target = "1" if target == "2" else "2"
    fleet.wait_for_versions({"edge": {"digits": "1" if target == "2" else "2"}})
    _assert_consistent(fleet, "edge")
