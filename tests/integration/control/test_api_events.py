"""How far a deployment got on each node, a deploy no node can run, one node's detail, and the fleet's event feed."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from control_harness import Harness, NodeCredentials, StartServer

from strata.control.settings import ServerSettings
from strata.control.telemetry import TelemetryService


def _report(server: Harness, node: NodeCredentials, labels: dict[str, str], **fields: Any) -> None:
    status = {"tier": "device", "labels": labels, "profile": "cpu-generic", "models": [], "failures": [], **fields}
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers)
    assert response.status_code == 204, response.text


def _running(version: str, previous: str | None = None) -> dict[str, Any]:
    return {
        "name": "digits",
        "version": version,
        "variant": "cpu-generic-fp32",
        "digest": "sha256:" + version * 64,
        "activated_at": 1.0,
        "previous_version": previous,
        "previous_digest": "sha256:" + previous * 64 if previous else None,
    }


def _events(server: Harness, **params: Any) -> list[dict[str, Any]]:
    response = server.client.get("/v1/events", params=params, headers=server.admin)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()
    return events


def test_a_deployment_says_where_each_node_stands_and_one_no_node_can_run_is_refused(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    assert server.upload(make_package(version="1")).status_code == 201
    assert server.upload(make_package(version="2", profile="x86_64-cuda")).status_code == 201
    eu = {"region": "eu"}
    running, failing, waiting = (server.enroll(name, eu) for name in ("a-runs", "b-fails", "c-waits"))
    other = server.enroll("d-elsewhere", {"region": "us"})
    _report(server, running, eu, models=[_running("1")])
    failure = {"model": "digits", "version": "1", "reason": "health check failed: output differs", "at": 1.0}
    _report(server, failing, eu, failures=[{**failure, "kind": "health"}])
    assert server.desired(waiting).status_code == 200  # it is online: it polls

    created = server.deploy("digits", "1", eu)
    assert (created["matched_nodes"], created["runnable_nodes"], created["done"]) == (3, 3, False)
    assert created["counts"] == {
        "running": 1, "pending": 1, "failed": 1, "no-variant": 0, "excluded": 0, "superseded": 0,
    }  # fmt: skip
    one = server.client.get(f"/v1/deployments/{created['id']}", headers=server.admin).json()
    states = {n["name"]: (n["state"], n["detail"]) for n in one["nodes"]}
    assert states == {
        "a-runs": ("running", "variant cpu-generic-fp32"),
        "b-fails": ("failed", "health: health check failed: output differs"),
        "c-waits": ("pending", "on its way"),
    }
    _report(server, waiting, eu, models=[_running("1")])
    listed = server.client.get("/v1/deployments", headers=server.admin).json()
    assert (listed[0]["counts"]["running"], listed[0]["done"], listed[0]["nodes"]) == (2, True, [])

    # Version 2 has a CUDA variant only: no node of the selector can run it, and the deploy says so at once.
    refused = server.client.post(
        "/v1/deployments", json={"model": "digits", "version": "2", "selector": eu}, headers=server.admin
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"].startswith("no node can run digits 2: 3 nodes match and none has a variant")
    assert "a-runs: profile cpu-generic runs none of its variants (built for x86_64-cuda)" in refused.json()["error"]
    assert len(server.client.get("/v1/deployments", headers=server.admin).json()) == 1  # nothing was made
    forced = server.client.post(
        "/v1/deployments",
        json={"model": "digits", "version": "2", "selector": eu, "force": True},
        headers=server.admin,
    ).json()
    assert (forced["runnable_nodes"], forced["counts"]["no-variant"], forced["done"]) == (0, 3, True)
    # The older deployment now decides no node of it: the newer one does.
    older = server.client.get(f"/v1/deployments/{created['id']}", headers=server.admin).json()
    assert {n["state"] for n in older["nodes"]} == {"superseded"}
    assert older["nodes"][0]["detail"] == f"deployment {forced['id']} decides: digits 2"
    # Matching no node now is fine: nodes may enroll later.
    later = server.deploy("digits", "1", {"region": "ap"})
    assert (later["matched_nodes"], later["done"]) == (0, True)
    assert server.client.delete(f"/v1/deployments/{later['id']}", headers=server.admin).status_code == 204
    assert server.client.get(f"/v1/deployments/{later['id']}", headers=server.admin).status_code == 404
    del other


def test_the_event_feed_and_one_nodes_detail(server: Harness, make_package: Callable[..., bytes]) -> None:
    assert server.upload(make_package(version="1")).status_code == 201
    node = server.enroll("edge-1", {"site": "x"})
    _report(server, node, {"site": "x"}, models=[_running("1")])
    server.clock.advance(10)
    _report(server, node, {"site": "x"}, models=[_running("2", previous="1")])
    _report(server, node, {"site": "x"}, models=[_running("1")])  # back to its previous slot
    failure = {"model": "digits", "version": "2", "reason": "no space left", "at": 2.0, "kind": "download"}
    _report(server, node, {"site": "x"}, models=[_running("1")], failures=[failure])
    _report(server, node, {"site": "x"}, models=[_running("1")], failures=[{**failure, "attempts": 2}])
    deployed = server.deploy("digits", "1", {"site": "x"})

    detail = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert detail["slots"] == [
        {
            "model": "digits",
            "active": {"version": "1", "variant": "cpu-generic-fp32", "digest": "sha256:" + "1" * 64},
            "activated_at": 1.0,
            "previous": None,
            "probation": None,
        }
    ]
    assert detail["enrolled_at"] == server.clock.now - 10
    assert detail["certificate_expires_at"] > server.clock.now
    assert detail["failures"][0]["reason"] == "no space left"

    server.client.delete(f"/v1/nodes/{node.node_id}", headers=server.admin)
    everything = _events(server)
    assert [(e["kind"], e["message"]) for e in everything] == [
        ("enrolled", "enrolled: tier device, profile cpu-generic"),
        ("activated", "digits: activated 1 cpu-generic-fp32"),
        ("activated", "digits: activated 2 cpu-generic-fp32 (was 1)"),
        ("rolled_back", "digits: rolled back to 1 cpu-generic-fp32 (was 2)"),
        ("failed", "digits 2 failed (download): no space left"),  # once: a retry failing alike is not news
        ("deployed", f"deployment {deployed['id']}: digits 1 to site=x"),
        ("revoked", "revoked by the operator"),
    ]
    assert {e["node"] for e in everything if e["kind"] != "deployed"} == {"edge-1"}
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids)
    assert [e["kind"] for e in _events(server, kind=["failed", "revoked"])] == ["failed", "revoked"]
    assert len(_events(server, node="edge-1")) == 6
    assert len(_events(server, node=node.node_id)) == 6  # a revoked node's events stay its own
    # A name that is no node is an error, not an empty feed (it answered [] as for a node with nothing to tell).
    nobody = server.client.get("/v1/events", params={"node": "edge-9"}, headers=server.admin)
    assert (nobody.status_code, nobody.json()["error"]) == (404, "no node 'edge-9' (live or revoked)")
    assert _events(server, node="edge-1", kind=["gate"]) == []  # a node with nothing of that kind: nothing
    assert [e["id"] for e in _events(server, after=ids[4])] == ids[5:]
    assert [e["id"] for e in _events(server, limit=2)] == ids[-2:]  # the latest, oldest first
    assert [e["id"] for e in _events(server, after=ids[0], limit=2)] == ids[1:3]  # following: the next ones
    assert [e["kind"] for e in _events(server, since=server.clock.now)] == [
        "activated",
        "rolled_back",
        "failed",
        "deployed",
        "revoked",
    ]
    bad = server.client.get("/v1/events", params={"kind": "exploded"}, headers=server.admin)
    assert bad.status_code == 422
    assert "unknown event kind exploded: one of enrolled, revoked" in bad.json()["error"]
    # A read-only token reads the feed; a node cannot.
    read = server.client.post("/v1/api-tokens", json={"scope": "read"}, headers=server.admin).json()["token"]
    assert server.client.get("/v1/events", headers={"Authorization": f"Bearer {read}"}).status_code == 200
    other = server.enroll("edge-2")
    assert server.client.get("/v1/events", headers=other.headers).status_code == 403


YEAR = 365 * 86400.0


def test_events_older_than_the_retention_are_deleted_in_chunks_and_the_feed_cursor_stays_valid(
    server: Harness,
) -> None:
    for name in ("edge-1", "edge-2", "edge-3"):  # an `enrolled` event each
        server.enroll(name)
    old = _events(server)
    assert [e["kind"] for e in old] == ["enrolled"] * 3
    server.clock.advance(YEAR - 60)
    server.enroll("edge-4")  # within the retention when the sweep runs
    server.clock.advance(120)

    assert server.plane.events.sweep(YEAR, chunk=2, pause_s=0) == 3  # in two chunks
    assert server.plane.events.sweep(YEAR, chunk=2, pause_s=0) == 0
    kept = _events(server)
    assert [e["node"] for e in kept] == ["edge-4"]
    # a follower's cursor from before the sweep still reads what came after it, and ids are never reused
    assert _events(server, after=old[-1]["id"]) == kept
    server.enroll("edge-5")
    newest = _events(server, after=kept[-1]["id"])
    assert [e["node"] for e in newest] == ["edge-5"]
    assert newest[0]["id"] > kept[-1]["id"]
    metrics = server.client.get("/metrics", headers=server.admin).text
    assert "strata_events_expired_total 3.0" in metrics


def test_a_sweep_of_events_told_to_stop_ends_after_its_current_chunk(server: Harness) -> None:
    for name in ("edge-1", "edge-2", "edge-3"):
        server.enroll(name)
    server.clock.advance(YEAR + 60)
    stop = threading.Event()
    stop.set()
    assert server.plane.events.sweep(YEAR, chunk=2, pause_s=0, stop=stop) == 2
    assert server.plane.events.sweep(YEAR, chunk=2, pause_s=0) == 1  # the next sweep goes on


def test_the_server_sweeps_expired_events_in_the_background(
    settings: ServerSettings, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="strata.control.app"),
        start_server(replace(settings, telemetry_sweep_s=0.1, event_retention_s=30 * 86400.0)) as server,
    ):
        server.enroll("edge")
        server.clock.advance(31 * 86400.0)
        deadline = time.monotonic() + 10  # the sweeper runs on the replica holding the rollout lease
        while _events(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _events(server) == []
    assert "event retention 30d: deleted 1 event" in caplog.text


def test_a_sweep_that_fails_unexpectedly_is_logged_and_the_sweeps_go_on(
    settings: ServerSettings,
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Conflict (an ingest folding the same expired minutes on PostgreSQL) or a bug ended the sweeper task for
    # good: only StoreError was caught.
    real, calls = TelemetryService.sweep, []

    def failing_once(self: TelemetryService, *args: Any, **kwargs: Any) -> dict[str, int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TelemetryService, "sweep", failing_once)  # fault injection, before the sweeper starts
    with (
        caplog.at_level(logging.INFO, logger="strata.control.app"),
        start_server(replace(settings, telemetry_sweep_s=0.1, event_retention_s=30 * 86400.0)) as server,
    ):
        server.enroll("edge")
        server.clock.advance(31 * 86400.0)
        deadline = time.monotonic() + 10
        while (len(calls) < 2 or _events(server)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 2
        assert _events(server) == []
    assert "telemetry retention sweep failed, will retry" in caplog.text
    assert "RuntimeError: injected" in caplog.text
