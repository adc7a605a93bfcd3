"""A site of ten devices behind one near-edge relay: a version that changes about 5% of the weights moves
about 5% of the model over the WAN, each changed chunk once; devices get the rest from the relay."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from strata.core.package import Package, pack_tar
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

LAYERS = 20
WIDTH = 512  # 20 matrices of 512 x 512 float32: 1 MiB each, a 20 MiB model


def mlp(path: Path, changed_layers: int) -> None:
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32) for _ in range(LAYERS)]
    for i in range(changed_layers):  # fine-tuning the last layers
        weights[-1 - i] = (weights[-1 - i] * 0.9).astype(np.float32)
    nodes, previous = [], "x"
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"]))
        previous = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTH])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["n", WIDTH])],
        [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def push(fleet: LocalFleet, tmp_path: Path, version: str, changed_layers: int) -> Package:
    mlp(tmp_path / f"v{version}.onnx", changed_layers)
    sample = {"x": np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)}
    package = build_package(
        tmp_path / f"v{version}.onnx", tmp_path / f"p{version}", name="mlp", version=version, sample=sample
    )
    pack_tar(package, tmp_path / f"v{version}.tar")
    fleet.client.push_package(tmp_path / f"v{version}.tar")
    return package


def wan_bytes(fleet: LocalFleet) -> int:
    admin = {"authorization": f"Bearer {fleet.admin_token}"}
    text = httpx.get(f"{fleet.server_url}/metrics", headers=admin, verify=fleet.tls()).text
    found = re.search(r"^strata_blob_bytes_served_total (\S+)$", text, re.M)
    assert found is not None
    return int(float(found.group(1)))


def relay_counter(fleet: LocalFleet, name: str) -> float:
    text = httpx.get(f"{fleet.agents['gateway'].serve_url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_ten_devices_behind_a_relay_move_each_changed_chunk_once(fleet: LocalFleet, tmp_path: Path) -> None:
    site = {"site": "plant-7"}
    gateway = fleet.start_agent("gateway", "near-edge", site)
    fleet.wait_for(
        lambda: "serving other tiers" in gateway.process.log_tail(20), 60, "the relay to listen", gateway.process
    )
    devices = [f"device-{i}" for i in range(10)]
    for name in devices:
        fleet.start_agent(name, "device", site, extra_args=["--relay", gateway.tier_url, "--threads", "1"])
    v1 = push(fleet, tmp_path, "1", changed_layers=0)
    fleet.client.deploy("mlp", "1", site)
    everyone = ["gateway", *devices]
    fleet.wait_for_versions({name: {"mlp": "1"} for name in everyone}, timeout=180)
    first_wan = wan_bytes(fleet)
    model_bytes = v1.manifest.file("model.onnx").size
    assert first_wan < 1.3 * model_bytes  # the first version crossed the WAN about once for the whole site

    v2 = push(fleet, tmp_path, "2", changed_layers=1)
    changed = {c.sha256 for c in v2.manifest.file("model.onnx").chunks} - {
        c.sha256 for c in v1.manifest.file("model.onnx").chunks
    }
    changed_bytes = sum(c.size for c in v2.manifest.file("model.onnx").chunks if c.sha256 in changed)
    before = wan_bytes(fleet)
    fleet.client.deploy("mlp", "2", site)
    fleet.wait_for_versions({name: {"mlp": "2"} for name in everyone}, timeout=180)
    update_wan = wan_bytes(fleet) - before

    assert changed_bytes < 0.08 * model_bytes  # the new version really changed about 5% of the weights
    small_files = sum(f.size for f in v2.manifest.files if not f.chunks)
    manifest_bytes = 64 * 1024
    assert update_wan <= changed_bytes + small_files + manifest_bytes  # each changed piece crossed once
    assert update_wan < 0.10 * model_bytes
    assert relay_counter(fleet, "strata_relay_bytes_served") >= 9 * changed_bytes
    print(
        f"\nmodel {model_bytes} B; v1 over the WAN {first_wan} B for 11 nodes; v2 changed {changed_bytes} B "
        f"({100 * changed_bytes / model_bytes:.1f}%), WAN carried {update_wan} B "
        f"({100 * update_wan / model_bytes:.1f}% of the model) for the whole site"
    )
