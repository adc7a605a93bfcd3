"""The whole path with real processes: package, push, deploy by labels, pull, verify, activate, serve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e_helpers import push_model

from strata.core.oip import encode_request
from strata.examples.digits import load_data
from strata.localfleet import LocalFleet

pytestmark = pytest.mark.slow

X = load_data().test_x[:16]


def labels_from(url: str, version: str | None = None) -> tuple[str, list[int]]:
    path = f"/v2/models/digits/versions/{version}/infer" if version else "/v2/models/digits/infer"
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}
    response = httpx.post(url + path, json=body, timeout=10)
    assert response.status_code == 200, response.text
    answer = response.json()
    label = next(o for o in answer["outputs"] if o["name"] == "label")
    return answer["model_version"], label["data"]


def local_labels(model: Path) -> list[int]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return [int(v) for v in session.run(["label"], {"X": X})[0]]


def test_deploy_by_labels_then_update_one_region_through_the_cli(
    fleet: LocalFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    fleet.start_agent("eu-1", "device", {"fleet": "t", "region": "eu"})
    fleet.start_agent("us-1", "near-edge", {"fleet": "t", "region": "us"})
    fleet.wait_for(lambda: len(fleet.nodes()) == 2, 30, "two nodes")

    pushed = fleet.cli("model", "push", str(digits_onnx), "--name", "digits", "--version", "1", "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)[0]["variant"] == "cpu-generic-fp32"
    deployed = fleet.cli("deploy", "digits", "1", "--selector", "fleet=t", "--wait", "--timeout", "60s")
    assert deployed.returncode == 0, deployed.stderr
    assert "deployment 1: digits 1 to fleet=t (2 running)" in deployed.stderr  # --wait returns once both run it
    assert all(n["models"] == {"digits": "1"} for n in fleet.nodes().values())
    follow = subprocess.Popen(
        fleet.strata("events", "--follow", "--json", "--interval", "0.2s", "--kind", "activated", "--since", "10m"),
        env=fleet.cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert labels_from(fleet.agents["eu-1"].serve_url) == ("1", local_labels(digits_onnx))

    push_model(fleet, digits_onnx_v2, "2", tmp_path)
    assert fleet.cli("deploy", "digits", "2", "--selector", "region=eu").returncode == 0
    nodes = fleet.wait_for_versions({"eu-1": {"digits": "2"}, "us-1": {"digits": "1"}})
    assert labels_from(fleet.agents["eu-1"].serve_url) == ("2", local_labels(digits_onnx_v2))
    assert labels_from(fleet.agents["us-1"].serve_url)[0] == "1"
    # The previous slot is kept for rollback.
    state = json.loads((fleet.agents["eu-1"].data_dir / "state.json").read_text())
    assert state["models"]["digits"]["previous"]["version"] == "1"
    shown = fleet.cli("nodes", "show", "eu-1", "--json")
    assert shown.returncode == 0, shown.stderr
    [slot] = json.loads(shown.stdout)["slots"]
    assert (slot["active"]["version"], slot["previous"]["version"]) == ("2", "1")
    table = fleet.cli("nodes", "show", "eu-1")
    assert "certificate expires" in table.stdout
    assert re.search(r"labels \(assigned\) +fleet=t, region=eu", table.stdout)
    # `strata nodes logs`: the node cannot be reached, so the ask rides in its desired state and it uploads the last
    # lines of its own log; they hold its activations.
    logs = fleet.cli("nodes", "logs", "eu-1", "--lines", "500", "--wait", "30s")
    assert logs.returncode == 0, logs.stderr
    assert re.search(r"strata\.agent\[eu-1\]: activated digits 2 \(cpu-generic-fp32\)", logs.stdout), logs.stdout
    assert "[us-1]" not in logs.stdout
    # `strata events --follow` printed the activation of version 2 as it happened (one JSON object a line).
    try:
        assert follow.stdout is not None
        followed = [json.loads(follow.stdout.readline()) for _ in range(3)]  # the two activations of 1, then 2's
    finally:
        follow.terminate()
        follow.wait(10)
    assert [(e["kind"], e["node"], e["version"]) for e in followed][2] == ("activated", "eu-1", "2")
    assert {e["node"] for e in followed[:2]} == {"eu-1", "us-1"}
    listed_deployments = json.loads(fleet.cli("deploy", "list", "--json").stdout)
    assert [(d["id"], d["version"], d["counts"]["running"]) for d in listed_deployments] == [
        ("2", "2", 1),
        ("1", "1", 1),
    ]
    assert listed_deployments[1]["counts"]["superseded"] == 1  # eu-1 follows the newer deployment

    listed = fleet.cli("nodes", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["eu-1"]["models"] == {"digits": "2"}
    assert rows["us-1"]["tier"] == "near-edge"
    assert rows["us-1"]["labels"] == {"fleet": "t", "region": "us"}
    assert all(row["online"] for row in rows.values())
    assert nodes["eu-1"]["in_sync"]
    table = fleet.cli("nodes", "list")
    assert "eu-1" in table.stdout
    assert "digits=2" in table.stdout

    # A mistyped label matches no node: said at once, and --wait exits 1 (it waited for nothing and exited 0)
    typo = fleet.cli("deploy", "digits", "1", "--selector", "region=ue", "--wait", "--timeout", "20s")
    assert typo.returncode == 1, typo.stderr
    said = " ".join(typo.stderr.split())
    assert "no node has these labels now" in said
    assert "no node matches region=ue: none runs digits 1" in said


def test_token_create_prints_the_token_alone_on_its_last_line(fleet: LocalFleet) -> None:
    created = fleet.cli("token", "create", "--ttl", "10m")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert len(token) >= 32
    assert " " not in token


def test_a_node_cannot_read_another_nodes_desired_state(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> None:
    a = fleet.start_agent("node-a", labels={"who": "a"})
    b = fleet.start_agent("node-b", labels={"who": "b"})
    fleet.wait_for(lambda: len(fleet.nodes()) == 2, 30, "two nodes")
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"who": "b"})
    fleet.wait_for_versions({"node-b": {"digits": "1"}, "node-a": {}})

    id_a, id_b = fleet.node_id(a.name), fleet.node_id(b.name)
    as_a = fleet.tls("node-a")  # node A's own certificate and key
    own = httpx.get(f"{fleet.server_url}/v1/nodes/{id_a}/desired", verify=as_a)
    assert own.status_code == 200
    other = httpx.get(f"{fleet.server_url}/v1/nodes/{id_b}/desired", verify=as_a)
    assert other.status_code == 403
    assert "error" in other.json()
    status = {"tier": "device", "labels": {"who": "b"}, "profile": "cpu-generic"}
    assert httpx.put(f"{fleet.server_url}/v1/nodes/{id_b}/status", json=status, verify=as_a).status_code == 403

    # A second agent process holding node A's key and certificate but claiming node B's id is refused too.
    thief_dir = tmp_path / "thief"
    shutil.copytree(a.data_dir / "trust", thief_dir / "trust")
    forged = json.loads((thief_dir / "trust" / "identity.json").read_text())
    (thief_dir / "trust" / "identity.json").write_text(json.dumps({**forged, "node_id": id_b}))
    thief = fleet.start_agent("thief", labels={"who": "b"}, enroll=False, data_dir=thief_dir)
    fleet.wait_for(lambda: "refused" in thief.process.log_tail(50), 30, "the thief to be refused", thief.process)
    assert not (thief_dir / "desired.json").exists()
    assert list((thief_dir / "packages").iterdir()) == []


def test_node_keeps_serving_without_its_control_plane(
    fleet: LocalFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    fleet.start_agent("edge", labels={"site": "x"})
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"site": "x"})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    url = fleet.agents["edge"].serve_url

    fleet.stop_server()
    assert labels_from(url)[0] == "1"
    # Restarted while the server is gone, it comes back serving from its data folder.
    fleet.restart_agent("edge")
    fleet.wait_for(lambda: fleet.agent_live("edge"), 30, "the agent to serve again", fleet.agents["edge"].process)
    assert labels_from(url) == ("1", local_labels(digits_onnx))
    ready = httpx.get(url + "/v2/health/ready")
    assert ready.status_code == 200

    fleet.start_server()
    push_model(fleet, digits_onnx_v2, "2", tmp_path)
    fleet.client.deploy("digits", "2", {"site": "x"})
    fleet.wait_for_versions({"edge": {"digits": "2"}}, timeout=90)
    assert labels_from(url)[0] == "2"


def test_restart_reuses_the_stored_credential(fleet: LocalFleet) -> None:
    handle = fleet.start_agent("edge")
    identity = handle.data_dir / "trust" / "identity.json"
    fleet.wait_for(identity.exists, 30, "enrollment", handle.process)
    first = (json.loads(identity.read_text()), (handle.data_dir / "trust" / "node.pem").read_text())
    # Same arguments, including the (now used) enrollment token: it must be ignored.
    argv = handle.process.argv
    handle.process.stop()
    handle.process.start()
    assert "--enroll-token" in argv
    fleet.wait_for(lambda: fleet.agent_live("edge"), 30, "restart", handle.process)
    time.sleep(1)
    assert handle.process.running, handle.process.log_tail()
    assert (json.loads(identity.read_text()), (handle.data_dir / "trust" / "node.pem").read_text()) == first
    assert len(fleet.nodes()) == 1


def test_wrong_inputs_get_4xx_from_a_real_agent(fleet: LocalFleet, digits_onnx: Path, tmp_path: Path) -> None:
    fleet.start_agent("edge")
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    url = fleet.agents["edge"].serve_url + "/v2/models/digits/infer"
    cases = [
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 63], "data": [0.0] * 63}]},
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]},
        {"inputs": [{"name": "X", "datatype": "INT64", "shape": [1, 64], "data": [0] * 64}]},
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 10}]},
    ]
    for body in cases:
        response = httpx.post(url, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]
    binary, length = encode_request({"X": np.zeros((1, 64), np.float32)})
    assert length is not None
    response = httpx.post(url, content=binary[:-4], headers={"Inference-Header-Content-Length": str(length)})
    assert response.status_code == 400
    missing = httpx.post(fleet.agents["edge"].serve_url + "/v2/models/nope/infer", json=cases[0])
    assert missing.status_code == 404
