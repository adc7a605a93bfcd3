"""Deployments and desired state over the API: label selection, ETags, long polls and their cost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from control_harness import Harness, recorded_statements, writes

from strata.control.fleet import FLEET_READ_AFTER_MISSES
from strata.core.wire import DesiredState


def _models(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    state = DesiredState.from_json(response.json())
    assert response.headers["ETag"] == state.etag
    return {m.name: m.version for m in state.models}


@pytest.fixture
def fleet(server: Harness, make_package: Callable[..., bytes]) -> Harness:
    """digits 1 (two variants) and 2, and detector 1, uploaded."""
    for name, version, profile in [
        ("digits", "1", "cpu-generic"),
        ("digits", "1", "x86_64-avx2"),
        ("digits", "2", "cpu-generic"),
        ("detector", "1", "cpu-generic"),
    ]:
        assert server.upload(make_package(name=name, version=version, profile=profile)).status_code == 201
    return server


def test_desired_state_follows_the_latest_matching_deployment(fleet: Harness) -> None:
    lab = fleet.enroll("lab-1", {"site": "lab"})
    shop = fleet.enroll("shop-1", {"site": "shop", "ring": "canary"})
    assert _models(fleet.desired(lab)) == {}

    everywhere = fleet.deploy("digits", "1")
    assert everywhere["matched_nodes"] == 2
    assert everywhere["selector"] == {}
    assert _models(fleet.desired(lab)) == {"digits": "1"}
    assert _models(fleet.desired(shop)) == {"digits": "1"}

    canary = fleet.deploy("digits", "2", {"ring": "canary"})
    assert canary["matched_nodes"] == 1
    fleet.deploy("detector", "1", {"site": "lab"})
    assert _models(fleet.desired(lab)) == {"detector": "1", "digits": "1"}
    assert _models(fleet.desired(shop)) == {"digits": "2"}

    state = fleet.desired(lab).json()
    digits = next(m for m in state["models"] if m["name"] == "digits")
    assert digits["deployment"] == everywhere["id"]
    assert [v["id"] for v in digits["variants"]] == ["cpu-generic-fp32", "x86_64-avx2-fp32"]
    version = fleet.client.get("/v1/models/digits/versions/1", headers=fleet.admin).json()
    assert [(v["digest"], v["blob"], v["size"]) for v in digits["variants"]] == [
        (v["digest"], v["blob"], v["size"]) for v in version["variants"]
    ]

    listed = fleet.client.get("/v1/deployments", headers=fleet.admin).json()
    assert [d["model"] + d["version"] for d in listed] == ["detector1", "digits2", "digits1"]

    # Deleting the canary deployment puts the shop back on the fleet-wide version.
    assert fleet.client.delete(f"/v1/deployments/{canary['id']}", headers=fleet.admin).status_code == 204
    assert _models(fleet.desired(shop)) == {"digits": "1"}
    assert fleet.client.delete(f"/v1/deployments/{everywhere['id']}", headers=fleet.admin).status_code == 204
    assert _models(fleet.desired(shop)) == {}
    assert fleet.client.delete(f"/v1/deployments/{everywhere['id']}", headers=fleet.admin).status_code == 404


def test_deployment_ids_are_never_reused(fleet: Harness) -> None:
    first = fleet.deploy("digits", "1")
    assert fleet.client.delete(f"/v1/deployments/{first['id']}", headers=fleet.admin).status_code == 204
    assert fleet.deploy("digits", "1")["id"] != first["id"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "nope", "version": "1"}, 404, "no model 'nope'"),
        ({"model": "digits", "version": "9"}, 404, "has no version '9'"),
        ({"model": "digits", "version": "1", "selector": {"": "x"}}, 422, "selector"),
        ({"model": "digits"}, 422, "version"),
    ],
)
def test_deployment_requests_are_checked(fleet: Harness, body: dict[str, Any], status: int, fragment: str) -> None:
    response = fleet.client.post("/v1/deployments", json=body, headers=fleet.admin)
    assert response.status_code == status
    assert fragment in response.json()["error"]


def test_unknown_deployment_id_is_404(server: Harness) -> None:
    for deployment_id in ("12345", "abc"):
        assert server.client.delete(f"/v1/deployments/{deployment_id}", headers=server.admin).status_code == 404


def test_labels_a_node_reports_are_claims_and_only_the_operator_changes_the_desired_state(fleet: Harness) -> None:
    node = fleet.enroll("edge-1", {"site": "lab"})
    fleet.deploy("digits", "2", {"ring": "canary"})
    assert _models(fleet.desired(node)) == {}
    status = {"tier": "near-edge", "labels": {"site": "lab", "ring": "canary"}, "profile": "cpu-generic"}
    assert fleet.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers).status_code == 204
    assert _models(fleet.desired(node)) == {}
    view = fleet.client.get(f"/v1/nodes/{node.node_id}", headers=fleet.admin).json()
    assert (view["tier"], view["labels"]) == ("device", {"site": "lab"})
    assert view["claims"] == {"tier": "near-edge", "labels": {"site": "lab", "ring": "canary"}}

    assigned = fleet.client.patch(f"/v1/nodes/{node.node_id}", json={"labels": {"ring": "canary"}}, headers=fleet.admin)
    assert assigned.status_code == 200, assigned.text
    assert assigned.json()["labels"] == {"site": "lab", "ring": "canary"}
    assert assigned.json()["claims"] == {"tier": "near-edge"}
    assert _models(fleet.desired(node)) == {"digits": "2"}
    removed = fleet.client.patch(f"/v1/nodes/{node.node_id}", json={"labels": {"ring": None}}, headers=fleet.admin)
    assert removed.json()["labels"] == {"site": "lab"}
    assert _models(fleet.desired(node)) == {}
    # The node itself cannot call the operator's endpoint.
    own = fleet.client.patch(f"/v1/nodes/{node.node_id}", json={"labels": {"ring": "canary"}}, headers=node.headers)
    assert own.status_code == 403


def test_etag_makes_an_unchanged_poll_a_304(fleet: Harness) -> None:
    node = fleet.enroll("edge-1")
    fleet.deploy("digits", "1")
    first = fleet.desired(node)
    etag = first.headers["ETag"]
    unchanged = fleet.desired(node, etag)
    assert unchanged.status_code == 304
    assert unchanged.headers["ETag"] == etag
    assert unchanged.content == b""
    assert fleet.desired(node, '"sha256:stale"').status_code == 200
    assert fleet.desired(node, f"W/{etag}").status_code == 304


def test_an_unchanged_poll_touches_no_database(fleet: Harness) -> None:
    node = fleet.enroll("edge-1")
    fleet.deploy("digits", "1")
    etag = fleet.desired(node).headers["ETag"]  # warms the credential and desired-state caches
    with recorded_statements(fleet.plane.db.engine) as statements:
        for _ in range(5):
            assert fleet.desired(node, etag).status_code == 304
        assert fleet.desired(node, etag, wait=0.2).status_code == 304
        assert fleet.desired(node).status_code == 200
    assert writes(statements) == []
    assert statements == []
    # ...yet the node counts as seen: presence lives in memory until the next flush.
    assert fleet.plane.presence.last_seen(node.node_id) == fleet.clock.now


def test_a_fleet_change_elsewhere_does_not_cost_a_poll_a_write(fleet: Harness) -> None:
    node = fleet.enroll("edge-1", {"site": "lab"})
    etag = fleet.desired(node).headers["ETag"]
    fleet.deploy("digits", "1", {"site": "elsewhere"})
    with recorded_statements(fleet.plane.db.engine) as statements:
        assert fleet.desired(node, etag).status_code == 304
    assert writes(statements) == []


def test_long_poll_returns_as_soon_as_a_deployment_changes_the_state(fleet: Harness) -> None:
    node = fleet.enroll("edge-1", {"site": "lab"})
    etag = fleet.desired(node).headers["ETag"]
    answer: dict[str, Any] = {}

    def poll() -> None:
        answer["response"] = fleet.desired(node, etag, wait=30)
        answer["at"] = time.monotonic()

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.5)
    # A change that does not concern this node keeps it waiting...
    fleet.deploy("digits", "1", {"site": "elsewhere"})
    time.sleep(0.3)
    assert poller.is_alive()
    # ...one that does ends the wait at once: the answer came after it (measured from it, not from the poll's
    # start, which a loaded machine may delay), and carries it.
    deployed = time.monotonic()
    fleet.deploy("digits", "2", {"site": "lab"})
    poller.join(timeout=10)
    assert not poller.is_alive()
    assert _models(answer["response"]) == {"digits": "2"}
    assert deployed < answer["at"] < deployed + 5


def test_long_poll_times_out_with_a_304(fleet: Harness) -> None:
    node = fleet.enroll("edge-1")
    etag = fleet.desired(node).headers["ETag"]
    started = time.monotonic()
    response = fleet.desired(node, etag, wait=0.5)
    assert response.status_code == 304
    assert 0.45 < time.monotonic() - started < 3


def test_a_node_holds_at_most_a_few_long_polls_waiting(fleet: Harness) -> None:
    # R3 review: a node could open thousands of polls, each holding a connection for up to a minute, until the
    # server ran out of file descriptors. Past MAX_WAITING_POLLS_PER_NODE its polls are answered at once; the polls
    # already waiting, and an operator's, still wait; a change still wakes them all.
    from strata.control.api.nodes import MAX_WAITING_POLLS_PER_NODE

    node, other = fleet.enroll("edge-1", {"site": "lab"}), fleet.enroll("edge-2")
    etag, other_etag = fleet.desired(node).headers["ETag"], fleet.desired(other).headers["ETag"]
    held: list[httpx.Response] = []
    pollers = [
        threading.Thread(target=lambda: held.append(fleet.desired(node, etag, wait=30)))
        for _ in range(MAX_WAITING_POLLS_PER_NODE)
    ]
    waiting: dict[str, int] = fleet.client.app.app.state.waiting_polls  # under the harness's TLS shim
    for poller in pollers:
        poller.start()
    deadline = time.monotonic() + 10
    while waiting.get(node.node_id) != MAX_WAITING_POLLS_PER_NODE and time.monotonic() < deadline:
        time.sleep(0.02)
    assert waiting.get(node.node_id) == MAX_WAITING_POLLS_PER_NODE
    started = time.monotonic()
    assert fleet.desired(node, etag, wait=30).status_code == 304  # over its share: at once
    assert time.monotonic() - started < 5
    started = time.monotonic()
    assert fleet.desired(other, other_etag, wait=0.5).status_code == 304  # another node's poll still waits
    assert time.monotonic() - started >= 0.45
    fleet.deploy("digits", "2", {"site": "lab"})
    for poller in pollers:
        poller.join(timeout=10)
    assert [_models(r) for r in held] == [{"digits": "2"}] * MAX_WAITING_POLLS_PER_NODE
    assert waiting == {}


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_wait_is_bounded(server: Harness, wait: str) -> None:
    node = server.enroll("edge-1")
    response = server.client.get(f"/v1/nodes/{node.node_id}/desired", params={"wait": wait}, headers=node.headers)
    assert response.status_code == 422


def test_revoked_nodes_are_no_longer_targets(fleet: Harness) -> None:
    kept = fleet.enroll("edge-1")
    gone = fleet.enroll("edge-2")
    fleet.deploy("digits", "1")
    assert _models(fleet.desired(gone)) == {"digits": "1"}
    assert fleet.client.delete(f"/v1/nodes/{gone.node_id}", headers=fleet.admin).status_code == 204
    assert fleet.deploy("digits", "2")["matched_nodes"] == 1
    revoked_state = fleet.client.get(f"/v1/nodes/{gone.node_id}/desired", headers=fleet.admin)
    assert _models(revoked_state) == {}
    assert _models(fleet.desired(kept)) == {"digits": "2"}


def test_admin_reads_any_nodes_desired_state_and_unknown_nodes_are_404(fleet: Harness) -> None:
    node = fleet.enroll("edge-1")
    fleet.deploy("digits", "1")
    response = fleet.client.get(f"/v1/nodes/{node.node_id}/desired", headers=fleet.admin)
    assert _models(response) == {"digits": "1"}
    assert fleet.client.get("/v1/nodes/nope/desired", headers=fleet.admin).status_code == 404


def test_a_claimed_profile_waits_for_the_operator(server: Harness, make_package: Callable[..., bytes]) -> None:
    """A profile a node reports is never adopted by itself: a placement rule may key on it, and a profile adopted
    today would be trusted by every deployment made tomorrow."""
    avx2_only = {"rules": [{"name": "avx2-only", "allow": 'node.profile == "x86_64-avx2"'}]}
    assert server.upload(make_package(name="digits", version="1")).status_code == 201
    node = server.enroll("edge-1")

    def report(profile: str) -> None:
        status = {"tier": "device", "labels": {}, "profile": profile}
        response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers)
        assert response.status_code == 204

    report("x86_64-avx2")  # nothing depends on it yet; still a claim
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert (view["profile"], view["claims"]) == ("cpu-generic", {"profile": "x86_64-avx2"})
    # A model deployed afterwards whose rule keys on the profile does not reach it on the claim alone.
    assert server.upload(make_package(name="avx2-model", version="1", policy=avx2_only)).status_code == 201
    server.deploy("avx2-model", "1")
    server.deploy("digits", "1")
    assert _models(server.desired(node)) == {"digits": "1"}
    accepted = server.client.patch(f"/v1/nodes/{node.node_id}", json={"accept_profile": True}, headers=server.admin)
    assert (accepted.json()["profile"], accepted.json()["claims"]) == ("x86_64-avx2", {})
    assert _models(server.desired(node)) == {"avx2-model": "1", "digits": "1"}


def test_a_node_enrolled_again_keeps_the_profile_it_had(server: Harness) -> None:
    """Enrolled again (with a token from `strata nodes reenroll`), a node took the profile the machine claimed,
    over the one the operator had accepted, which placement policies may key on. It keeps it now; the machine's
    claim waits for `strata nodes accept`, as a report's does."""
    node = server.enroll("edge-1")
    again = server.enroll("edge-1", reenroll=True, profile="x86_64-avx2")
    assert again.node_id == node.node_id
    status = {"tier": "device", "labels": {}, "profile": "x86_64-avx2"}
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=again.headers)
    assert response.status_code == 204
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert (view["profile"], view["claims"]) == ("cpu-generic", {"profile": "x86_64-avx2"})
    assert server.enroll("edge-2", profile="x86_64-avx2")  # a new node starts from what it detected
    fresh = [n for n in server.client.get("/v1/nodes", headers=server.admin).json() if n["name"] == "edge-2"]
    assert fresh[0]["profile"] == "x86_64-avx2"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "javascript:alert(1)",
        "https://127.0.0.1:8443/path",
        "https://user:pw@127.0.0.1:8443",
        "https://127.0.0.1",
        "https://127.0.0.1:8443\r\nX: y",
        "https://127.0.0.1:8443?x=1",
        "https://" + "a" * 5000 + ":1",
    ],
)
def test_a_serve_url_is_only_an_address(server: Harness, url: str) -> None:
    node = server.enroll("edge-1")
    status = {"tier": "device", "labels": {}, "profile": "cpu-generic", "serve_url": url}
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers)
    assert response.status_code == 422, response.text
    assert "serve_url" in response.json()["error"]
    good = {**status, "serve_url": "https://[::1]:8443"}
    assert server.client.put(f"/v1/nodes/{node.node_id}/status", json=good, headers=node.headers).status_code == 204


def test_a_change_that_wakes_the_whole_fleet_reads_every_nodes_facts_once(fleet: Harness) -> None:
    """After a deploy, the first polls read their own node, the FLEET_READ_AFTER_MISSES-th reads every node, and the
    rest are answered from memory, with the same desired states a per-node read gives."""
    nodes = [fleet.enroll(f"edge-{i}", {"site": "lab"}) for i in range(FLEET_READ_AFTER_MISSES + 20)]
    fleet.deploy("digits", "1", {"site": "lab"})
    with recorded_statements(fleet.plane.db.engine) as statements:
        answers = [fleet.desired(node) for node in nodes]
    assert all(_models(answer) == {"digits": "1"} for answer in answers)
    fact_reads = [s for s in statements if "nodes.attestation" in s and "FROM nodes" in s]
    assert len(fact_reads) == FLEET_READ_AFTER_MISSES
    assert "WHERE" not in fact_reads[-1]  # the last one reads every node
    # Each answer is what the node gets by the other path: read again in reverse order, the nodes read one by one
    # above are now answered from the fleet-wide read, and the other way round.
    fleet.plane.feed.bump()
    for node, answer in reversed(list(zip(nodes, answers, strict=True))):
        assert fleet.desired(node).content == answer.content


def test_the_long_poll_checks_its_caller_and_its_wait_as_every_route_does(fleet: Harness) -> None:
    # The poll reads its own parameters (a deploy answers the whole fleet's polls at once): the same rules hold.
    node, other = fleet.enroll("lab-1", {"site": "lab"}), fleet.enroll("lab-2", {"site": "lab"})
    url = f"/v1/nodes/{node.node_id}/desired"
    assert fleet.client.get(url, headers=node.headers).status_code == 200
    assert fleet.client.get(url, headers=fleet.admin).status_code == 200
    for headers in (other.headers, {}, {"authorization": "Bearer nope"}, {"authorization": "Basic abc"}):
        answer = fleet.client.get(url, headers=headers)
        assert answer.status_code in (401, 403), headers
        assert set(answer.json()) == {"error", "code"}
    for wait in ("soon", "-1", "61", "nan", "inf", "1e999"):
        answer = fleet.client.get(url, params={"wait": wait}, headers=node.headers)
        assert answer.status_code == 422, wait
        assert answer.json()["error"].startswith("query.wait"), answer.text
    missing = fleet.client.get("/v1/nodes/0123/desired", headers=fleet.admin)
    assert missing.status_code == 404
