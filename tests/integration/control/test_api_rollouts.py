"""Rollouts over the API with a real control plane: waves, gates, rollback, pins, policy, history, restarts.

Nodes are played by the test: they poll their desired state and report what a real agent would report, so every
step is deterministic (the server's clock is a ManualClock and the driver is stepped with `tick`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from control_harness import Harness, NodeCredentials, StartServer

from strata.control import rollouts as rollouts_module
from strata.control.settings import ServerSettings
from strata.core.package import tar_bytes
from strata.core.telemetry import DriftRow, MinuteRow, TelemetryBatch, encode_batch
from strata.core.wire import DesiredState
from strata.examples.digits import load_data
from strata.package_build import build_package

DIGEST = {"1": "sha256:" + "1" * 64, "2": "sha256:" + "2" * 64, "3": "sha256:" + "3" * 64}


@pytest.fixture
def quiet_settings(settings: ServerSettings) -> ServerSettings:
    # The background driver would only repeat what `tick` does; keep it out of the way.
    return replace(settings, rollout_interval_s=3600, rollout_debounce_s=3600)


@pytest.fixture
def server(quiet_settings: ServerSettings, start_server: StartServer) -> Iterator[Harness]:
    with start_server(quiet_settings) as harness:
        yield harness


@pytest.fixture
def registry(server: Harness, make_package: Callable[..., bytes]) -> Harness:
    for version in ("1", "2"):
        assert server.upload(make_package(version=version)).status_code == 201
    return server


def models(server: Harness, node: NodeCredentials) -> dict[str, str]:
    response = server.desired(node)
    assert response.status_code == 200, response.text
    return {m.name: m.version for m in DesiredState.from_json(response.json()).models}


def report(
    server: Harness,
    node: NodeCredentials,
    labels: dict[str, str],
    version: str | None,
    *,
    failures: list[dict[str, Any]] | None = None,
    p95: float = 4.0,
    requests: int = 100,
    errors: int = 0,
    probation: str = "passed",
    profile: str = "cpu-generic",
) -> None:
    running = []
    if version is not None:
        serving = {"requests": requests, "errors": errors, "latency_p95_ms": p95, "since": 0.0}
        running.append(
            {
                "name": "digits",
                "version": version,
                "variant": "cpu-generic-fp32",
                "digest": DIGEST[version],
                "activated_at": server.clock.now,
                "serving": serving,
                "probation": probation,
            }
        )
    status = {"tier": "device", "labels": labels, "profile": profile, "models": running, "failures": failures or []}
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers)
    assert response.status_code == 204, response.text


def rollout(server: Harness, rollout_id: str) -> dict[str, Any]:
    response = server.client.get(f"/v1/rollouts/{rollout_id}", headers=server.admin)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def create(server: Harness, **fields: Any) -> dict[str, Any]:
    body = {"model": "digits", "version": "2", "bake_seconds": 60, **fields}
    response = server.client.post("/v1/rollouts", json=body, headers=server.admin)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


class Fleet:
    """Enrolled test nodes that answer like agents: they run whatever their desired state says."""

    def __init__(self, server: Harness, count: int, region: str = "eu-west") -> None:
        self.server = server
        self.nodes: dict[str, tuple[NodeCredentials, dict[str, str]]] = {}
        for i in range(count):
            labels = {"fleet": "t", "region": region if i % 2 else "eu-north", "site": f"s{i}"}
            self.nodes[f"n{i}"] = (server.enroll(f"n{i}", labels), labels)

    def converge(self, **report_fields: Any) -> dict[str, str | None]:
        """Every node polls and reports running its desired version of digits (or the `version` its fields
        say, for a node that could not take it); return name -> version."""
        running = {}
        for name, (node, labels) in self.nodes.items():
            fields = dict(report_fields.get(name, {}))
            version = fields.pop("version", models(self.server, node).get("digits"))
            report(self.server, node, labels, version, **fields)
            running[name] = version
        return running


def test_a_good_rollout_goes_wave_by_wave_and_survives_a_restart(
    quiet_settings: ServerSettings, start_server: StartServer, make_package: Callable[..., bytes]
) -> None:
    with start_server(quiet_settings) as server:
        for version in ("1", "2"):
            assert server.upload(make_package(version=version)).status_code == 201
        fleet = Fleet(server, 10)
        server.deploy("digits", "1", {"fleet": "t"})
        assert set(fleet.converge().values()) == {"1"}

        created = create(server, waves="1,50%", selector={"fleet": "t"})
        assert created["status"] == "running"
        assert [w["target"] for w in created["waves_detail"]] == ["1", "50%", "100%"]  # 100% is implied
        assert [w["nodes"] for w in created["waves_detail"]] == [1, 4, 5]
        running = fleet.converge()
        canary = [name for name, version in running.items() if version == "2"]
        assert len(canary) == 1
        state = server.desired(fleet.nodes[canary[0]][0]).json()
        assert state["models"][0]["deployment"] == f"rollout/{created['id']}"

        server.plane.rollouts.tick()
        assert rollout(server, created["id"])["counts"]["healthy"] == 1
        server.clock.advance(30)
        server.plane.rollouts.tick()
        assert rollout(server, created["id"])["wave"] == 1  # still baking

        server.clock.advance(31)
        server.plane.rollouts.tick()
        status = rollout(server, created["id"])
        assert status["wave"] == 2
        assert [g["passed"] for g in status["gate_results"]] == [True, True, True, True]  # the defaults, drift too

    # The server stops and starts again mid-rollout: everything it needs is in the database.
    with start_server(quiet_settings) as again:
        fleet.server = again
        assert sum(v == "2" for v in fleet.converge().values()) == 5
        again.plane.rollouts.tick()
        again.clock.advance(61)
        again.plane.rollouts.tick()
        assert rollout(again, created["id"])["wave"] == 3
        assert set(fleet.converge().values()) == {"2"}
        again.plane.rollouts.tick()
        again.clock.advance(61)
        again.plane.rollouts.tick()
        final = rollout(again, created["id"])
        assert final["status"] == "succeeded"
        assert final["counts"] == {"healthy": 10}
        assert {n["current_version"] for n in final["nodes"]} == {"2"}
        assert {n["previous_version"] for n in final["nodes"]} == {"1"}

        history = again.client.get("/v1/models/digits/history", headers=again.admin).json()
        assert len([e for e in history if e["version"] == "2" and e["kind"] == "activated"]) == 10
        # The fleet's event feed tells the same story, a wave's gates with their numbers included.
        feed = again.client.get("/v1/events", params={"kind": ["gate", "rollout"]}, headers=again.admin).json()
        told = [e["message"] for e in feed if e["rollout"] == created["id"]]
        assert told[0] == f"rollout {created['id']}: digits 2 to fleet=t started"
        assert told[1].startswith("wave 1 passed its gates: activation_success_rate>=0.95: 1 pass")
        assert [m.split(":")[0] for m in told[2:]] == [
            "wave 2 passed its gates",
            "wave 3 passed its gates",
            f"rollout {created['id']}",
        ]
        assert told[-1].startswith(f"rollout {created['id']}: succeeded")
        assert len([e for e in history if e["version"] == "1"]) == 10


def test_a_canary_that_fails_to_activate_rolls_everyone_back(registry: Harness) -> None:
    fleet = Fleet(registry, 6)
    registry.deploy("digits", "1", {"fleet": "t"})
    fleet.converge()
    created = create(registry, waves="2,50%", selector={"fleet": "t"})
    canary = [n for n, (node, _) in fleet.nodes.items() if models(registry, node)["digits"] == "2"]
    assert len(canary) == 2
    # One canary takes it; the other fails its golden check and keeps serving 1, as a real agent does.
    failure = {"model": "digits", "version": "2", "reason": "health check failed: output differs", "at": 1.0}
    fleet.converge(**{canary[1]: {"version": "1", "failures": [{**failure, "kind": "health"}]}})
    registry.plane.rollouts.tick()

    status = rollout(registry, created["id"])
    assert status["status"] == "rolled_back"
    gate = status["failed_gate"]
    assert gate["metric"] == "activation_success_rate"
    assert gate["wave"] == 0
    assert gate["value"] == 0.5
    assert "1 of 2 nodes that tried" in gate["detail"]
    failed = [n for n in status["nodes"] if n["state"] == "failed"]
    assert [n["name"] for n in failed] == [canary[1]]
    assert "golden" in failed[0]["failure"] or "health" in failed[0]["failure"]
    # Every node of the rollout is sent back to the version it had.
    assert set(fleet.converge().values()) == {"1"}
    assert {n["current_version"] for n in rollout(registry, created["id"])["nodes"]} == {"1"}
    history = registry.client.get("/v1/models/digits/history", headers=registry.admin).json()
    back = [e for e in history if e["node"] == canary[0]]
    assert [(e["kind"], e["version"]) for e in back][:2] == [("activated", "1"), ("activated", "2")]
    # One node's history, filtered by the server (before its limit), by name or id; a node that is not one is a 404.
    for who in (canary[0], back[0]["node_id"]):
        mine = registry.client.get(
            "/v1/models/digits/history", params={"node": who, "limit": 2}, headers=registry.admin
        ).json()
        assert mine == back[:2]
    nobody = registry.client.get("/v1/models/digits/history", params={"node": "nosuch"}, headers=registry.admin)
    assert nobody.status_code == 404
    assert "no node 'nosuch'" in nobody.text
    feed = registry.client.get("/v1/events", params={"after": 0}, headers=registry.admin).json()
    told = [
        (e["kind"], e["node"], e["message"]) for e in feed if e["rollout"] == created["id"] or e["kind"] == "failed"
    ]
    assert told == [
        ("rollout", None, f"rollout {created['id']}: digits 2 to fleet=t started"),
        ("failed", canary[1], "digits 2 failed (health): health check failed: output differs"),
        ("failed", canary[1], f"rollout {created['id']}: health: health check failed: output differs"),
        ("gate", None, f"gate activation_success_rate>=0.95 failed in wave 1: {gate['detail']}"),
        ("rollout", None, f"rollout {created['id']}: rolled_back ({status['message']})"),
    ]


def test_three_times_the_latency_fails_the_latency_gate_with_its_numbers(registry: Harness) -> None:
    fleet = Fleet(registry, 6)
    registry.deploy("digits", "1", {"fleet": "t"})
    fleet.converge()
    created = create(registry, waves="2", selector={"fleet": "t"}, on_failure="pause")
    canary = [n for n, (node, _) in fleet.nodes.items() if models(registry, node)["digits"] == "2"]
    slow = {name: {"p95": 12.0} for name in canary}
    fleet.converge(**slow)
    registry.plane.rollouts.tick()
    registry.clock.advance(61)
    registry.plane.rollouts.tick()

    status = rollout(registry, created["id"])
    assert status["status"] == "paused"
    gate = status["failed_gate"]
    assert gate["metric"] == "p95_latency_ratio"
    assert gate["value"] == pytest.approx(3.0)
    assert "canary p95 12 ms vs baseline 4 ms" in gate["detail"]
    # Paused, not rolled back: the canaries keep the new version until the operator decides.
    assert sorted(n for n, v in fleet.converge(**slow).items() if v == "2") == sorted(canary)

    aborted = registry.client.post(f"/v1/rollouts/{created['id']}/abort", headers=registry.admin)
    assert aborted.json()["status"] == "aborted"
    assert aborted.json()["counts"] == {"rolled_back": 2, "unchanged": 4}  # the canaries had run 2
    assert set(fleet.converge().values()) == {"1"}


def test_pause_resume_abort_and_who_may_call(registry: Harness) -> None:
    fleet = Fleet(registry, 4)
    registry.deploy("digits", "1")
    fleet.converge()
    created = create(registry, waves="1")
    rid = created["id"]
    node = next(iter(fleet.nodes.values()))[0]
    assert registry.client.get(f"/v1/rollouts/{rid}", headers=node.headers).status_code == 403
    assert registry.client.get(f"/v1/rollouts/{rid}").status_code == 401
    assert registry.client.post(f"/v1/rollouts/{rid}/resume", headers=registry.admin).status_code == 409
    assert registry.client.post(f"/v1/rollouts/{rid}/pause", headers=registry.admin).json()["status"] == "paused"
    second = registry.client.post("/v1/rollouts", json={"model": "digits", "version": "2"}, headers=registry.admin)
    assert second.status_code == 409
    assert registry.client.post(f"/v1/rollouts/{rid}/resume", headers=registry.admin).json()["status"] == "running"
    aborted = registry.client.post(f"/v1/rollouts/{rid}/abort", headers=registry.admin).json()
    assert aborted["status"] == "aborted"
    # Its canary was released and never ran 2: it keeps what it had, no longer "updating"; the rest never moved.
    assert aborted["counts"] == {"unchanged": 4}
    assert [(w["nodes"], w["unchanged"], w["rolled_back"], w["failed"]) for w in aborted["waves_detail"]] == [
        (1, 1, 0, 0),
        (3, 3, 0, 0),
    ]
    assert {n["state"] for n in aborted["nodes"]} == {"unchanged"}
    assert registry.client.post(f"/v1/rollouts/{rid}/abort", headers=registry.admin).status_code == 409
    assert registry.client.get("/v1/rollouts/999", headers=registry.admin).status_code == 404
    bad = registry.client.post(
        "/v1/rollouts", json={"model": "digits", "version": "2", "gates": ["drift<=0.1"]}, headers=registry.admin
    )
    assert bad.status_code == 400
    assert "unknown metric" in bad.json()["error"]
    missing = registry.client.post("/v1/rollouts", json={"model": "digits", "version": "9"}, headers=registry.admin)
    assert missing.status_code == 404


def test_a_wave_that_is_not_a_number_is_refused_and_a_rollout_that_cannot_step_stops_only_itself(
    registry: Harness, make_package: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # "nan%" was stored, its first step raised ValueError, and that ended the whole tick (and the driver's task):
    # no rollout of any model moved again.
    for waves in ("nan%", "1,nan%", "inf", "1e400"):
        bad = registry.client.post(
            "/v1/rollouts", json={"model": "digits", "version": "2", "waves": waves}, headers=registry.admin
        )
        assert bad.status_code == 400, (waves, bad.text)
        assert "finite" in bad.json()["error"]
    for version in ("1", "2"):
        assert registry.upload(make_package(name="other", version=version)).status_code == 201
    fleet = Fleet(registry, 4)
    registry.deploy("digits", "1")
    fleet.converge()
    broken = create(registry, model="other", waves="1")["id"]  # stepped first: rollouts step in id order
    healthy = create(registry, waves="1")["id"]
    real_plan = rollouts_module.plan_rollout

    def plan(state: Any, observations: Any, now: float) -> Any:
        if str(state.id) == broken:
            raise ValueError("a bug in planning one rollout")
        return real_plan(state, observations, now)

    monkeypatch.setattr(rollouts_module, "plan_rollout", plan)
    fleet.converge()
    registry.plane.rollouts.tick()  # raised ValueError
    registry.clock.advance(61)
    registry.plane.rollouts.tick()
    assert rollout(registry, healthy)["wave"] == 2  # the other rollout goes on
    assert rollout(registry, broken)["wave"] == 1


def test_a_resumed_wave_gets_a_new_deadline_and_is_judged_again_when_it_settles(registry: Harness) -> None:
    # Its deadline stayed where it was: a wave paused for want of data by its deadline was paused again in the
    # resume's own step, whatever its nodes did next.
    fleet = Fleet(registry, 4)
    registry.deploy("digits", "1")
    fleet.converge()
    rid = create(registry, waves="1", wave_deadline_seconds=600, on_failure="pause")["id"]
    quiet = {name: {"requests": 3} for name in fleet.nodes}
    fleet.converge(**quiet)
    registry.plane.rollouts.tick()
    registry.clock.advance(601)
    registry.plane.rollouts.tick()
    paused = rollout(registry, rid)
    assert paused["status"] == "paused"
    assert paused["failed_gate"]["verdict"] == "fail_no_data"
    resumed = registry.client.post(f"/v1/rollouts/{rid}/resume", headers=registry.admin).json()
    assert (resumed["status"], resumed["wave"]) == ("running", 1)
    assert resumed["wave_started_at"] == registry.clock.now
    fleet.converge()  # traffic now
    registry.plane.rollouts.tick()
    registry.clock.advance(61)
    registry.plane.rollouts.tick()
    assert (rollout(registry, rid)["status"], rollout(registry, rid)["wave"]) == ("running", 2)


def test_a_pin_holds_its_node_and_the_rollout_leaves_it_out(registry: Harness) -> None:
    fleet = Fleet(registry, 3)
    registry.deploy("digits", "1")
    fleet.converge()
    pinned = fleet.nodes["n0"][0]
    pin = registry.client.post(
        "/v1/pins", json={"model": "digits", "version": "1", "node": "n0"}, headers=registry.admin
    )
    assert pin.status_code == 201, pin.text
    registry.deploy("digits", "2")  # a plain deployment does not move a pinned node either
    assert models(registry, pinned) == {"digits": "1"}
    assert models(registry, fleet.nodes["n1"][0]) == {"digits": "2"}
    nodes = {n["name"]: n for n in registry.client.get("/v1/nodes", headers=registry.admin).json()}
    assert nodes["n0"]["pins"] == {"digits": "1"}
    assert nodes["n1"]["pins"] == {}

    created = create(registry, waves="100%")
    excluded = rollout(registry, created["id"])["excluded"]
    assert excluded == [{"node": "n0", "reason": f"pinned to 1 (pin {pin.json()['id']})", "refused": False}]

    assert registry.client.delete(f"/v1/pins/{pin.json()['id']}", headers=registry.admin).status_code == 204
    assert models(registry, pinned) == {"digits": "2"}
    assert registry.client.get("/v1/pins", headers=registry.admin).json() == []
    both = {"model": "digits", "version": "1", "node": "n0", "selector": {"a": "b"}}
    assert registry.client.post("/v1/pins", json=both, headers=registry.admin).status_code == 422


def test_a_rollout_during_a_freeze_ends_aborted_and_the_freeze_ending_moves_no_node(registry: Harness) -> None:
    """Every node pinned to 1 (a freeze), a rollout of 2 has no node to release: it ends aborted, saying no node
    took part. It used to end succeeded, and a succeeded rollout stands for its selector: when the pin went, the
    whole fleet was told 2 at once, with no wave, bake or gate."""
    fleet = Fleet(registry, 4)
    registry.deploy("digits", "1")
    fleet.converge()
    freeze = registry.client.post(
        "/v1/pins", json={"model": "digits", "version": "1", "selector": {"fleet": "t"}}, headers=registry.admin
    )
    assert freeze.status_code == 201, freeze.text
    created = create(registry, waves="1,50%")
    ended = rollout(registry, created["id"])
    assert ended["status"] == "aborted"
    assert ended["message"].startswith("no node took part: the selector matches 4 nodes, all kept out")
    # New-user trial: the feed said "wave 1 passed its gates" for each wave walked past, though no wave had a node
    # and no gate judged anything
    feed = registry.client.get("/v1/events", params={"kind": ["gate", "rollout"]}, headers=registry.admin).json()
    told = [e["message"] for e in feed if e["rollout"] == created["id"]]
    assert told[0] == f"rollout {created['id']}: digits 2 to every node started"
    assert [m.split(" (")[0] for m in told[1:]] == [f"rollout {created['id']}: aborted"], told

    assert registry.client.delete(f"/v1/pins/{freeze.json()['id']}", headers=registry.admin).status_code == 204
    registry.plane.rollouts.tick()
    told = {name: models(registry, credentials)["digits"] for name, (credentials, _) in fleet.nodes.items()}
    assert told == dict.fromkeys(fleet.nodes, "1")
    again = create(registry, waves="1,100%")  # the model is free for a rollout that judges its nodes
    assert rollout(registry, again["id"])["status"] == "running"


def test_a_node_that_refuses_the_version_itself_is_marked_refused_apart_from_nodes_kept_out(registry: Harness) -> None:
    """The API said why in words only: a client could not tell a node that refused the version (out for good)
    from one kept out by a pin (back in once the pin goes) but by the words its reason begins with."""
    fleet = Fleet(registry, 3)
    registry.deploy("digits", "1")
    fleet.converge()
    pin = registry.client.post(
        "/v1/pins", json={"model": "digits", "version": "1", "node": "n0"}, headers=registry.admin
    )
    assert pin.status_code == 201, pin.text
    created = create(registry, waves="100%")
    # n1 takes version 2; n2's own placement policy says no, and it keeps serving 1, as a real agent does.
    refusal = {"model": "digits", "version": "2", "reason": "refused by placement policy", "at": 1.0, "kind": "policy"}
    fleet.converge(n2={"version": "1", "failures": [refusal]})
    registry.plane.rollouts.tick()

    status = rollout(registry, created["id"])
    assert [(e["node"], e["refused"]) for e in status["excluded"]] == [("n0", False), ("n2", True)]
    assert status["excluded"][1]["reason"] == "the node refused it: refused by placement policy"
    nodes = {n["name"]: (n["state"], n["refused"]) for n in status["nodes"]}
    assert nodes == {"n0": ("excluded", False), "n1": ("healthy", False), "n2": ("excluded", True)}
    listed = registry.client.get("/v1/rollouts", headers=registry.admin).json()
    assert [(e["node"], e["refused"]) for e in listed[0]["excluded"]] == [("n0", False), ("n2", True)]
    # The pin goes: n0 joins the last wave; n2, which refused the version itself, stays out.
    assert registry.client.delete(f"/v1/pins/{pin.json()['id']}", headers=registry.admin).status_code == 204
    registry.plane.rollouts.tick()
    assert [(e["node"], e["refused"]) for e in rollout(registry, created["id"])["excluded"]] == [("n2", True)]


def test_a_policy_keeps_a_model_off_nodes_even_when_deployed_there_directly(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    eu_only = {"data_class": "personal", "allowed_regions": ["eu-*"]}
    assert server.upload(make_package(version="1")).status_code == 201
    assert server.upload(make_package(version="3", policy=eu_only)).status_code == 201
    eu = server.enroll("eu-1", {"region": "eu-west"})
    us = server.enroll("us-1", {"region": "us-east"})
    server.deploy("digits", "1")
    server.deploy("digits", "3", {"region": "us-east"})  # the operator aims it at the US node directly
    server.deploy("digits", "3", {"region": "eu-west"})
    assert models(server, eu) == {"digits": "3"}
    assert models(server, us) == {"digits": "1"}  # the policy forbids 3 there; the next deployment decides

    created = create(server, version="3", waves="100%")
    status = rollout(server, created["id"])
    assert [e["node"] for e in status["excluded"]] == ["us-1"]
    assert "allowed_regions" in status["excluded"][0]["reason"]
    assert "us-east" in status["excluded"][0]["reason"]
    assert models(server, us) == {"digits": "1"}

    bad_rule = {"rules": [{"name": "broken", "allow": "node.tier =="}]}
    rejected = server.upload(make_package(version="4", policy=bad_rule))
    assert rejected.status_code == 422
    assert "broken" in rejected.json()["error"]


def test_a_single_request_canary_is_not_judged_for_drift_and_no_data_never_passes(
    server: Harness, make_package: Callable[..., bytes], digits_onnx: Path, tmp_path: Path
) -> None:
    """Issue 17: a canary smoke-tested with one request showed PSI 4.0 and rolled the rollout back, while the
    latency gate, without data, was recorded as passed. A gate now needs enough requests to judge, and without
    them holds the wave (the default policy) and says so; once traffic comes, the wave is judged and goes on."""
    assert server.upload(make_package(version="1")).status_code == 201
    sample = {"X": load_data().test_x[:300]}
    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="2", sample=sample)
    assert server.upload(tar_bytes(package)).status_code == 201
    reference = next(t for t in package.manifest.drift["tensors"] if t["tensor"] == "X")
    fleet = Fleet(server, 4)
    server.deploy("digits", "1", {"fleet": "t"})
    fleet.converge()
    created = create(server, waves="1", selector={"fleet": "t"})
    canary = next(n for n, (node, _) in fleet.nodes.items() if models(server, node)["digits"] == "2")
    node = fleet.nodes[canary][0]

    def telemetry(seq: int, requests: int, counts: list[int]) -> None:
        minute = int(server.clock.now // 60)
        rows = [MinuteRow("digits", "2", package.manifest.variant, minute, requests)]
        batch = TelemetryBatch(
            node.node_id, seq, 0.0, minutes=rows, drift=[DriftRow("digits", "2", minute, "X", counts)]
        )
        response = server.client.post(
            f"/v1/nodes/{node.node_id}/telemetry",
            content=encode_batch(batch),
            headers={**node.headers, "Content-Type": "application/vnd.strata.telemetry+zstd"},
        )
        assert response.status_code == 200, response.text

    # The smoke test: one fixed request whose values all fall in one bin (what made PSI 4.0), 256 of them (a larger
    # input than digits' 64): more than the 200 values a tensor needs, yet one request is no sample of the traffic.
    smoke = [0] * len(reference["counts"])
    smoke[0] = 256
    telemetry(1, 1, smoke)
    fleet.converge(**{canary: {"requests": 1}})
    server.plane.rollouts.tick()
    server.clock.advance(61)
    server.plane.rollouts.tick()
    status = rollout(server, created["id"])
    assert status["status"] == "running", status["message"]
    assert status["message"].startswith("wave 1: gate ")
    assert "waits for data" in status["message"]
    gates = {g["metric"]: g for g in status["gate_results"]}
    assert (gates["drift_psi"]["value"], gates["drift_psi"]["verdict"]) == (None, "no_data")
    assert "no canary node has served 100 requests since the wave started (the most: 1" in gates["drift_psi"]["detail"]
    latency = gates["p95_latency_ratio"]
    assert (latency["value"], latency["passed"], latency["verdict"]) == (None, False, "no_data")

    # Real traffic, shaped like the reference: the wave is judged on it and the rollout goes on.
    telemetry(2, 300, [int(c) for c in reference["counts"]])
    fleet.converge(**{canary: {"requests": 300}})
    server.plane.rollouts.tick()
    status = rollout(server, created["id"])
    gates = {g["metric"]: g for g in status["gate_results"]}
    assert gates["drift_psi"]["verdict"] == "pass", gates["drift_psi"]
    assert gates["drift_psi"]["value"] < 0.05
    assert gates["p95_latency_ratio"]["verdict"] == "pass"
    assert status["wave"] == 2
