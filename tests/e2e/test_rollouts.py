"""Rollouts with real processes: a control plane and agents on loopback, real models, the `strata` CLI.

A version that fails its golden check halts the rollout at the first wave; a version with three times the
latency fails the latency gate; a canary whose probation fails rolls back by itself while its server is down;
a model whose policy allows only `region=eu-*` never reaches a US node, and a node refuses it itself (and is out of
the next rollout for good, which the CLI says); the simulator
and the control plane decide a rollout alike, node by node (policy, hardware, pin).
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.core.hashing import sha256_file
from strata.core.package import pack_tar, verify_package
from strata.examples.compute import build_compute_model
from strata.localfleet import LocalFleet
from strata.package_build import build_package, with_fields
from strata.sim.engine import Simulation
from strata.sim.scenario import Scenario

pytestmark = pytest.mark.slow

BODY = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path / "fleet", poll_wait_s=2) as running:
        running.start_server()
        yield running


def push(fleet: LocalFleet, model: Path, version: str, workdir: Path, name: str = "digits") -> Path:
    package = build_package(model, workdir / f"{name}-{version}", name=name, version=version)
    tar = workdir / f"{name}-{version}.tar"
    pack_tar(package, tar)
    fleet.client.push_package(tar)
    return tar


def push_failing_golden(fleet: LocalFleet, model: Path, other: Path, version: str, workdir: Path) -> None:
    """A package that verifies (its manifest vouches for every byte) but whose golden outputs came from another
    model: it fails the node's health check, as a miscompiled build would."""
    package = build_package(model, workdir / f"broken-{version}", name="digits", version=version)
    (package.path / "model.onnx").write_bytes(other.read_bytes())
    sha, size = sha256_file(package.path / "model.onnx")
    files = tuple(
        dataclasses.replace(f, sha256=sha, size=size) if f.path == "model.onnx" else f for f in package.manifest.files
    )
    package = verify_package(with_fields(package, files=files).path)
    tar = workdir / f"broken-{version}.tar"
    pack_tar(package, tar)
    fleet.client.push_package(tar)


def infer(url: str, name: str = "digits") -> httpx.Response:
    return httpx.post(f"{url}/v2/models/{name}/infer", json=BODY, timeout=30)


def create_rollout(fleet: LocalFleet, *args: str) -> str:
    created = fleet.cli("rollout", "create", *args)
    assert created.returncode == 0, created.stderr
    rollout_id = created.stdout.strip().splitlines()[-1]
    assert rollout_id.isdecimal()
    return rollout_id


def wait_for_status(fleet: LocalFleet, rollout_id: str, status: str, timeout: float = 90) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        rollout = fleet.client.rollout(rollout_id)
        return rollout if rollout["status"] == status else None

    try:
        return fleet.wait_for(reached, timeout, f"rollout {rollout_id} to be {status}", interval=0.5)
    except Exception:
        print(json.dumps(fleet.client.rollout(rollout_id), indent=1))
        raise


class Traffic:
    """Sends requests one at a time, round-robin over the agents, until stopped (one at a time: so that the
    latency each node measures is its model's, not the contention of a two-core machine)."""

    def __init__(self, urls: list[str], name: str = "digits") -> None:
        self.urls = urls
        self.name = name
        self.stop = threading.Event()
        self.answers: dict[str, set[str]] = {url: set() for url in urls}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                for url in self.urls:
                    try:
                        answer = client.post(f"{url}/v2/models/{self.name}/infer", json=BODY)
                    except httpx.HTTPError:
                        continue
                    if answer.status_code == 200:
                        self.answers[url].add(answer.json()["model_version"])

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def test_a_version_that_fails_its_golden_check_stops_at_the_first_wave(
    fleet: LocalFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    regions = ("eu-west", "us-east", "ap-south")
    for i, region in enumerate(regions):
        fleet.start_agent(f"n{i}", labels={"fleet": "r", "region": region})
    push(fleet, digits_onnx, "1", tmp_path)
    assert fleet.cli("deploy", "digits", "1", "--selector", "fleet=r").returncode == 0
    fleet.wait_for_versions({f"n{i}": {"digits": "1"} for i in range(3)})

    push_failing_golden(fleet, digits_onnx_v2, digits_onnx, "2", tmp_path)
    args = ("digits", "2", "--selector", "fleet=r", "--waves", "1,100%", "--bake", "5s")
    waited = fleet.cli("rollout", "create", *args, "--wait", "--timeout", "90s")
    assert waited.returncode == 1, waited.stderr  # --wait: 1 when it does not succeed
    rollout_id = waited.stdout.strip().splitlines()[-1]
    assert f"rollout {rollout_id} rolled back: gate activation_success_rate>=0.95 failed" in waited.stderr
    rollout = wait_for_status(fleet, rollout_id, "rolled_back")
    watched = fleet.cli("rollout", "watch", rollout_id)
    assert watched.returncode == 1, watched.stderr
    assert "rolled back" in watched.stderr

    gate = rollout["failed_gate"]
    assert gate["metric"] == "activation_success_rate"
    assert gate["wave"] == 0
    assert gate["value"] == 0.0
    assert "0 of 1 node that tried" in gate["detail"]
    [canary] = [n for n in rollout["nodes"] if n["wave"] == 1]
    assert canary["state"] == "failed"
    assert "health check failed" in canary["failure"]
    assert all(n["state"] == "unchanged" for n in rollout["nodes"] if n["wave"] == 2)
    # The canary never left version 1 (its health check refused 2), and nobody else ever saw 2.
    fleet.wait_for_versions({f"n{i}": {"digits": "1"} for i in range(3)})
    for handle in fleet.agents.values():
        assert infer(handle.serve_url).json()["model_version"] == "1"
    history = json.loads(fleet.cli("model", "history", "digits", "--json").stdout)
    assert [e for e in history if e["version"] == "2"] == []

    shown = fleet.cli("rollout", "status", rollout_id)
    assert shown.returncode == 0, shown.stderr
    assert "rolled_back" in shown.stdout
    assert "failed gate" in shown.stdout
    assert "activation_success_rate" in shown.stdout

    # Deployed directly, the broken version fails on every node: `--wait` says so and exits 1.
    deployed = fleet.cli("deploy", "digits", "2", "--selector", "fleet=r", "--wait", "--timeout", "90s")
    assert deployed.returncode == 1, deployed.stderr
    assert "3 nodes failed to run digits 2" in deployed.stderr
    deployment_id = deployed.stdout.strip().splitlines()[-1]
    shown = fleet.cli("deploy", "show", deployment_id, "--json")
    states = {n["name"]: (n["state"], n["running"]) for n in json.loads(shown.stdout)["nodes"]}
    assert states == {f"n{i}": ("failed", "1") for i in range(3)}
    assert all("health check failed" in n["detail"] for n in json.loads(shown.stdout)["nodes"])
    failures = json.loads(fleet.cli("events", "--kind", "failed", "--json").stdout)
    assert {e["node"] for e in failures if "health check failed" in e["message"]} == {"n0", "n1", "n2"}
    assert fleet.cli("deploy", "rm", deployment_id).returncode == 0
    assert [d["id"] for d in fleet.client.deployments()] == ["1"]


def test_three_times_the_latency_fails_the_latency_gate(fleet: LocalFleet, tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast.onnx", tmp_path / "slow.onnx"
    # About 3 ms of compute a request, and about three times that (the layers triple and then some: the input and
    # output stages do not grow with them).
    build_compute_model(fast, layers=24, replicas=256)
    build_compute_model(slow, layers=80, replicas=256)
    # Probation off: this test is about the fleet's gate (3x is within the node's own 5x limit anyway).
    options = ["--threads", "1", "--report-interval", "1s", "--probation", "0"]
    for i in range(4):
        fleet.start_agent(f"n{i}", labels={"fleet": "l", "region": ("eu-west", "us-east")[i % 2]}, extra_args=options)
    push(fleet, fast, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"fleet": "l"})
    fleet.wait_for_versions({f"n{i}": {"digits": "1"} for i in range(4)})

    with Traffic([h.serve_url for h in fleet.agents.values()]) as traffic:
        time.sleep(3)  # every node serves and reports its figures on version 1
        push(fleet, slow, "2", tmp_path)
        rollout_id = create_rollout(
            fleet, "digits", "2", "--selector", "fleet=l", "--waves", "2,100%", "--bake", "5s", "--min-requests", "10"
        )
        rollout = wait_for_status(fleet, rollout_id, "rolled_back")
        gate = rollout["failed_gate"]
        assert gate["metric"] == "p95_latency_ratio"
        assert gate["wave"] == 0
        assert gate["value"] > 1.5
        assert "canary p95" in gate["detail"]
        assert "baseline" in gate["detail"]
        results = {r["metric"]: r for r in rollout["gate_results"]}
        assert results["activation_success_rate"]["passed"]
        assert results["activation_success_rate"]["value"] == 1.0
        canaries = [n["name"] for n in rollout["nodes"] if n["wave"] == 1]
        assert len(canaries) == 2
        fleet.wait_for_versions({f"n{i}": {"digits": "1"} for i in range(4)})
    served_2 = {url for url, versions in traffic.answers.items() if "2" in versions}
    assert served_2 == {fleet.agents[name].serve_url for name in canaries}  # the second wave never ran it


def test_a_canary_whose_probation_fails_rolls_back_by_itself_with_its_server_down(
    fleet: LocalFleet, tmp_path: Path
) -> None:
    fast, slow = tmp_path / "fast.onnx", tmp_path / "slow.onnx"
    build_compute_model(fast, layers=12, replicas=512)
    build_compute_model(slow, layers=240, replicas=512)  # twenty times the compute: over the 5x probation limit
    options = ["--threads", "1", "--report-interval", "1s", "--probation", "60s"]
    node = fleet.start_agent("edge", labels={"fleet": "p"}, extra_args=options)
    push(fleet, fast, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"fleet": "p"})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    for _ in range(60):
        assert infer(node.serve_url).json()["model_version"] == "1"

    push(fleet, slow, "2", tmp_path)
    rollout_id = create_rollout(fleet, "digits", "2", "--selector", "fleet=p", "--waves", "100%", "--bake", "5s")
    fleet.wait_for_versions({"edge": {"digits": "2"}})
    fleet.stop_server()

    served = [infer(node.serve_url).json()["model_version"] for _ in range(25)]
    assert served[0] == "2"
    fleet.wait_for(
        lambda: infer(node.serve_url).json()["model_version"] == "1", 30, "the node to roll back", node.process
    )
    log = node.process.log_tail(200)
    assert "probation failed" in log
    assert "rolled back to 1" in log
    state = json.loads((node.data_dir / "state.json").read_text())
    assert state["models"]["digits"]["active"]["version"] == "1"
    assert [f["kind"] for f in state["failures"].values()] == ["probation"]

    fleet.start_server()  # the node reports what it did; the rollout stops and rolls back
    rollout = wait_for_status(fleet, rollout_id, "rolled_back")
    assert rollout["failed_gate"]["metric"] == "activation_success_rate"
    [edge] = rollout["nodes"]
    assert edge["state"] == "failed"
    assert "probation" in edge["failure"]
    kinds = [(e["kind"], e["version"]) for e in fleet.client.model_history("digits")]
    assert ("rolled_back", "1") in kinds


def test_an_eu_only_model_never_reaches_a_us_node_and_the_node_refuses_it_itself(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    fleet.start_agent("eu", labels={"region": "eu-west"})
    fleet.start_agent("us", labels={"region": "us-east"})
    fleet.wait_for(lambda: len(fleet.nodes()) == 2, 30, "two nodes")
    policy = tmp_path / "eu-only.yaml"
    policy.write_text("data_class: personal\nallowed_regions: [eu-*]\n")
    pushed = fleet.cli("model", "push", str(digits_onnx), "--name", "faces", "--version", "1", "--policy", str(policy))
    assert pushed.returncode == 0, pushed.stderr

    # The operator aims it at the US node directly, then at everyone: only the EU node ever gets it.
    assert fleet.cli("deploy", "faces", "1", "--selector", "region=us-east").returncode == 0
    everyone = fleet.cli("deploy", "faces", "1")
    assert everyone.returncode == 2  # which nodes? a selector, or --all said out loud
    assert "give --selector k=v[,k=v], or --all for every node of the fleet" in everyone.stderr
    assert fleet.cli("deploy", "faces", "1", "--all").returncode == 0
    fleet.wait_for_versions({"eu": {"faces": "1"}, "us": {}})
    fleet.wait_for(lambda: fleet.nodes()["us"]["in_sync"], 30, "the US node to confirm its desired state")
    assert fleet.nodes()["us"]["models"] == {}
    assert infer(fleet.agents["us"].serve_url, "faces").status_code == 404
    rollout_id = create_rollout(fleet, "faces", "1", "--all", "--waves", "100%", "--bake", "1s")
    rollout = fleet.client.rollout(rollout_id)
    assert [(e["node"], "allowed_regions" in e["reason"]) for e in rollout["excluded"]] == [("us", True)]
    shown = fleet.cli("rollout", "status", rollout_id)
    assert "1 node kept out" in shown.stdout
    assert "us-east" in shown.stdout

    # The EU node is moved to the US while its server is down: it restarts from disk and refuses the model.
    fleet.stop_server()
    fleet.agents["eu"].labels = {"region": "us-east"}
    moved = fleet.restart_agent("eu")
    fleet.wait_for(lambda: fleet.agent_live("eu"), 30, "the moved node to serve", moved.process)
    assert infer(moved.serve_url, "faces").status_code == 404
    assert "refused by placement policy (allowed_regions)" in moved.process.log_tail(50)

    # Back up, the server hears the refusal: the rollout of version 1 has no node left to judge and ends. (Its gates
    # held it until then, waiting for traffic; an abort here would race the node's report.)
    fleet.start_server()
    ended = wait_for_status(fleet, rollout_id, "aborted", timeout=60)  # no node took part: it stands for nothing
    assert [(e["node"], e["refused"]) for e in ended["excluded"]] == [("eu", True), ("us", False)]
    assert ended["message"].startswith("no node took part: the selector matches 2 nodes, all kept out or refusing")

    # Its labels are the operator's (still eu-west): a rollout of version 2 releases it, and the node refuses that
    # too. It is out of the rollout for good, unlike the US node, and the CLI says which nodes refused.
    pushed = fleet.cli("model", "push", str(digits_onnx), "--name", "faces", "--version", "2", "--policy", str(policy))
    assert pushed.returncode == 0, pushed.stderr
    second = create_rollout(fleet, "faces", "2", "--all", "--waves", "100%", "--bake", "1s")

    def refused() -> list[tuple[str, bool]] | None:
        excluded = [(e["node"], e["refused"]) for e in fleet.client.rollout(second)["excluded"]]
        return excluded if len(excluded) == 2 else None

    assert fleet.wait_for(refused, 60, "the moved node to refuse version 2", moved.process) == [
        ("eu", True),
        ("us", False),
    ]
    shown = fleet.cli("rollout", "status", second)
    assert "2 excluded (1 refused the version)" in shown.stdout
    assert "2 nodes kept out (1 refused the version: out of this rollout for good):" in shown.stdout
    assert "eu (refused): the node refused it: " in shown.stdout
    listed = fleet.cli("rollout", "list")
    assert "2 (1 refused)" in listed.stdout


# One fleet, described once, run through the simulator and through the control plane with real agents.
PARITY_NODES = [
    {"name": "eu-1", "profile": "x86_64-avx2", "labels": {"region": "eu-west"}},
    {"name": "eu-2", "profile": "x86_64-avx2", "labels": {"region": "eu-west"}},
    {"name": "held", "profile": "x86_64-avx2", "labels": {"region": "eu-west"}},  # pinned to version 1
    {"name": "us", "profile": "x86_64-avx2", "labels": {"region": "us-east"}},  # outside the policy's regions
    {"name": "arm", "profile": "arm64-neon", "labels": {"region": "eu-west"}},  # no variant for its hardware
]
PARITY_POLICY = {"data_class": "personal", "allowed_regions": ["eu-*"]}


def decisions(nodes: list[dict[str, Any]], versions: dict[str, str | None]) -> dict[str, tuple[Any, ...]]:
    """Per node name: why the rollout may not reach it (None: it may), its wave (1-based), the version it ends on."""
    return {n["name"]: (n["excluded"], n["wave"], versions[n["name"]]) for n in nodes}


def test_the_simulator_and_the_control_plane_decide_alike_node_by_node(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    # The simulator, with the scenario's fleet, pin, policy and rollout.
    scenario = Scenario.from_json(
        {
            "name": "parity",
            "horizon": "1h",
            "fleet": {"nodes": PARITY_NODES},
            "model": {"name": "digits", "variants": ["x86_64-avx2"], "policy": PARITY_POLICY},
            "versions": {"2": {}},
            "pins": [{"version": "1", "node": "held"}],
            "rollout": {"version": "2", "start": "1m", "waves": "100%", "bake": "1s", "on_no_data": "pass"},
            "agent": {"probation": 0},
        }
    )
    simulation = Simulation(scenario)
    assert simulation.run().values["rollout_status"] == "succeeded"
    assert simulation.rollout is not None
    simulated = decisions(
        [
            {"name": a.node_id, "excluded": a.excluded, "wave": None if a.wave is None else a.wave + 1}
            for a in simulation.rollout.nodes.values()
        ],
        {node.node_id: node.active_version for node in simulation.nodes},
    )

    # The control plane and real agents, the same way round: version 1 everywhere it may go, a pin, the rollout.
    for node in PARITY_NODES:
        options = ["--probation", "0", "--report-interval", "1s"]
        fleet.start_agent(node["name"], labels=node["labels"], profile=node["profile"], extra_args=options)
    policy = tmp_path / "policy.yaml"
    policy.write_text(json.dumps(PARITY_POLICY))
    for version in ("1", "2"):
        pushed = fleet.cli(
            "model", "push", str(digits_onnx), "--name", "digits", "--version", version,
            "--profile", "x86_64-avx2", "--policy", str(policy),
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr
    assert fleet.cli("deploy", "digits", "1", "--all").returncode == 0
    on_1 = {"digits": "1"}
    fleet.wait_for_versions({"eu-1": on_1, "eu-2": on_1, "held": on_1, "us": {}, "arm": {}})
    fleet.client.create_pin("digits", "1", "held", {})
    rollout_id = create_rollout(
        fleet, "digits", "2", "--all", "--waves", "100%", "--bake", "1s", "--on-no-data", "pass"
    )
    rollout = wait_for_status(fleet, rollout_id, "succeeded")
    on_2 = {"digits": "2"}
    ran = fleet.wait_for_versions({"eu-1": on_2, "eu-2": on_2, "held": on_1, "us": {}, "arm": {}})
    real = decisions(rollout["nodes"], {name: node["models"].get("digits") for name, node in ran.items()})

    assert real == simulated
    assert real == {
        "eu-1": (None, 1, "2"),
        "eu-2": (None, 1, "2"),
        "held": ("pinned to 1 (pin 1)", None, "1"),
        "us": (
            "policy rule allowed_regions: node us has region 'us-east'; the model may run only in ['eu-*']",
            None,
            None,
        ),
        "arm": ("no variant of digits 2 runs on profile arm64-neon", None, None),
    }
