"""`strata optimize --push --sign-key` into a real control plane that accepts only signed packages (the README's),
then real agents of two profiles: each runs the variant selected for its own profile, or falls back to the
compatible generic one."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from strata.examples.digits import load_data
from strata.localfleet import LocalFleet
from strata.trust.signing import create_release_key

pytestmark = pytest.mark.slow


def active_variant(fleet: LocalFleet, name: str) -> str | None:
    path = fleet.agents[name].data_dir / "state.json"
    if not path.is_file():
        return None
    slots = json.loads(path.read_text()).get("models", {}).get("digits")
    return None if slots is None else str(slots["active"]["variant"])


def test_agents_run_the_variant_selected_for_their_profile(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    # A server with a release key refused `--push` after the whole optimization (it could not sign).
    private, public = create_release_key(tmp_path / "keys")
    fleet.stop_server()
    fleet.start_server(extra_args=["--release-key", str(public)])
    data = load_data()
    np.savez(tmp_path / "calibration.npz", X=data.train_x[:128])
    np.savez(tmp_path / "evaluation.npz", X=data.test_x, labels=data.test_y)
    args = [
        "optimize", str(digits_onnx), "--name", "digits", "--version", "1", "--task", "classification",
        "--calibration", str(tmp_path / "calibration.npz"), "--eval", str(tmp_path / "evaluation.npz"),
        "--target", "x86_64-avx2", "--target", "cpu-generic", "--pass", "graph", "--pass", "static",
        "--rounds", "1", "--no-memory",
    ]  # fmt: skip
    # a key that cannot sign fails before any work
    public_key = fleet.cli(*args, "--out", str(tmp_path / "no"), "--push", "--sign-key", str(public))
    assert public_key.returncode == 2
    assert "is a public key" in public_key.stderr
    unpushed = fleet.cli(*args, "--out", str(tmp_path / "no"), "--sign-key", str(private))
    assert unpushed.returncode == 2
    assert "add --push" in unpushed.stderr
    assert not (tmp_path / "no").exists()

    optimized = fleet.cli(
        *args, "--out", str(tmp_path / "out"), "--push", "--sign-key", str(private), "--json", timeout=300
    )
    assert optimized.returncode == 0, optimized.stderr
    answer = json.loads(optimized.stdout)
    selected = answer["report"]["selected"]
    assert set(selected) == {"x86_64-avx2", "cpu-generic"}
    pushed = {p["variant"] for p in answer["pushed"]}
    assert pushed == {f"{profile}-{variant}" for profile, variant in selected.items()}
    assert all(p["signature"] for p in answer["pushed"])

    shown = fleet.cli("model", "show", "digits", "1", "--json")
    assert shown.returncode == 0, shown.stderr
    registry = {v["id"]: v for v in json.loads(shown.stdout)["variants"]}
    assert set(registry) == pushed
    for profile, variant in selected.items():
        stored = registry[f"{profile}-{variant}"]
        assert stored["profile"] == profile
        assert stored["metrics"]["optimized_as"] == variant
        assert stored["metrics"]["gate"] == "passed"
        assert stored["metrics"]["top1_agreement"] >= 0.99
    table = fleet.cli("model", "show", "digits", "1")
    assert "top1_agreement=" in table.stdout

    fleet.start_agent("avx2", "device", {"fleet": "opt"}, profile="x86_64-avx2")
    fleet.start_agent("arm", "device", {"fleet": "opt"}, profile="arm64-neon")
    fleet.wait_for(lambda: len(fleet.nodes()) == 2, 30, "two nodes")
    assert fleet.cli("deploy", "digits", "1", "--selector", "fleet=opt").returncode == 0
    fleet.wait_for_versions({"avx2": {"digits": "1"}, "arm": {"digits": "1"}})
    assert active_variant(fleet, "avx2") == f"x86_64-avx2-{selected['x86_64-avx2']}"
    # No package was built for arm64-neon: that node falls back to the generic profile's selected variant.
    assert active_variant(fleet, "arm") == f"cpu-generic-{selected['cpu-generic']}"

    x = data.test_x[:8]
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    for name in ("avx2", "arm"):
        response = httpx.post(f"{fleet.agents[name].serve_url}/v2/models/digits/infer", json=body, timeout=10)
        assert response.status_code == 200, response.text
        label = next(o for o in response.json()["outputs"] if o["name"] == "label")
        assert len(label["data"]) == 8
