"""Enrollment: one-time expiring tokens, validation, re-enrollment that rotates the credential, revocation."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from control_harness import T0, Harness, node_key_and_csr

from strata.control.fleet import INVALID_ENROLLMENT


def _token(server: Harness, **body: Any) -> str:
    response = server.client.post("/v1/enrollment-tokens", json=body, headers=server.admin)
    assert response.status_code == 201
    token: str = response.json()["token"]
    return token


def _enroll_body(token: str, name: str = "edge-1", **fields: Any) -> dict[str, Any]:
    body = {"token": token, "name": name, "tier": "device", "labels": {}, "profile": "cpu-generic"}
    return {**body, "csr": node_key_and_csr(name), **fields}


def test_enrollment_token_expires_at_its_ttl(server: Harness) -> None:
    response = server.client.post("/v1/enrollment-tokens", json={"ttl_seconds": 60}, headers=server.admin)
    assert response.json()["expires_at"] == T0 + 60
    assert server.client.post("/v1/enrollment-tokens", json={}, headers=server.admin).json()["expires_at"] == (
        T0 + 3600
    )


@pytest.mark.parametrize("ttl", [0, -5, 7 * 24 * 3600 + 1])
def test_enrollment_token_ttl_is_bounded(server: Harness, ttl: int) -> None:
    response = server.client.post("/v1/enrollment-tokens", json={"ttl_seconds": ttl}, headers=server.admin)
    assert response.status_code == 422
    assert response.json()["code"] == "invalid_request"


def test_a_token_enrolls_once(server: Harness) -> None:
    token = _token(server)
    first = server.client.post("/v1/enroll", json=_enroll_body(token, "edge-1"))
    assert first.status_code == 201
    assert set(first.json()) == {"node_id", "certificate", "ca", "not_after", "issued_at"}
    assert first.json()["not_after"] == pytest.approx(T0 + 30 * 86400)  # a node offline for weeks comes back
    # the life, on the server's clock alone: a node counts it from its receipt on its own clock
    assert first.json()["not_after"] - first.json()["issued_at"] == pytest.approx(30 * 86400)
    again = server.client.post("/v1/enroll", json=_enroll_body(token, "edge-2"))
    assert again.status_code == 401
    assert again.json() == {"error": INVALID_ENROLLMENT, "code": "unauthenticated"}
    names = [n["name"] for n in server.client.get("/v1/nodes", headers=server.admin).json()]
    assert names == ["edge-1"]


def test_an_expired_token_does_not_enroll(server: Harness) -> None:
    token = _token(server, ttl_seconds=60)
    server.clock.advance(60)
    response = server.client.post("/v1/enroll", json=_enroll_body(token))
    assert response.status_code == 401
    assert response.json()["error"] == INVALID_ENROLLMENT


def test_an_unknown_token_does_not_enroll(server: Harness) -> None:
    response = server.client.post("/v1/enroll", json=_enroll_body("made-up"))
    assert response.status_code == 401
    assert response.json()["error"] == INVALID_ENROLLMENT


def test_racing_enrollments_with_one_token_enroll_one_node(server: Harness) -> None:
    token = _token(server)
    statuses: list[int] = []
    barrier = threading.Barrier(6)

    def enroll(index: int) -> None:
        barrier.wait()
        statuses.append(server.client.post("/v1/enroll", json=_enroll_body(token, f"edge-{index}")).status_code)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 401, 401, 401, 401, 401]
    assert len(server.client.get("/v1/nodes", headers=server.admin).json()) == 1


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"name": "../etc"}, "node name"),
        ({"name": ""}, "node name"),
        ({"tier": "fog"}, "tier"),
        ({"profile": "quantum-9000"}, "unknown hardware profile"),
        ({"labels": {"": "x"}}, "labels"),
        ({"labels": {"site": 3}}, "labels"),
    ],
)
def test_enrollment_validates_what_the_node_claims(server: Harness, fields: dict[str, Any], fragment: str) -> None:
    token = _token(server)
    response = server.client.post("/v1/enroll", json={**_enroll_body(token), **fields})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]
    # A refused request does not spend the token.
    assert server.client.post("/v1/enroll", json=_enroll_body(token)).status_code == 201


def test_a_token_pins_the_fleet_ca_and_fetches_it(server: Harness) -> None:
    token = _token(server)
    ca = server.plane.pki.ca
    assert token.split(".")[2] == ca.fingerprint.removeprefix("sha256:")
    fetched = server.client.get("/v1/ca", headers={"Authorization": f"Bearer {token}"})
    assert fetched.status_code == 200
    assert fetched.content == ca.cert_pem
    assert server.client.get("/v1/ca").status_code == 401
    assert server.client.get("/v1/ca", headers={"Authorization": "Bearer stk1.x.y"}).status_code == 401


def test_enrollment_needs_a_usable_csr(server: Harness) -> None:
    assert server.client.post("/v1/enroll", json=_enroll_body(_token(server), csr="")).status_code == 422
    garbage = server.client.post("/v1/enroll", json=_enroll_body(_token(server), csr="-----BEGIN nonsense"))
    assert garbage.status_code == 401
    assert "certificate request" in garbage.json()["error"]


def test_re_enrollment_keeps_the_id_and_the_assigned_labels_and_rotates_the_credential(server: Harness) -> None:
    first = server.enroll("edge-1", {"site": "a"})
    assert server.client.get("/v1/health", headers=first.headers).status_code == 200
    second = server.enroll("edge-1", {"site": "b"}, reenroll=True, agent_version="2.0")
    assert second.node_id == first.node_id
    assert second.headers != first.headers
    assert server.client.get("/v1/health", headers=first.headers).status_code == 401
    view = server.client.get(f"/v1/nodes/{second.node_id}", headers=second.headers).json()
    assert view["labels"] == {"site": "a"}  # the operator's; the new machine's --label is not an authority
    assert view["agent_version"] == "2.0"


def test_a_plain_token_cannot_take_over_an_enrolled_name(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """Attack: a holder of any enrollment token enrolls under an existing node's name, to replace its credential
    (and lift its revocation). The token is checked before any certificate is signed. And by mistake: a second
    machine started with a name that is taken re-keyed that node silently; now it needs --replace (409 without)."""
    victim = server.enroll("edge-1", {"site": "a"})
    plain = _token(server)
    taken = server.client.post("/v1/enroll", json=_enroll_body(plain, "edge-1"))
    assert taken.status_code == 409, taken.text
    message = taken.json()["error"]
    assert "enrolled already" in message
    assert "re-keys" in message
    assert "strata nodes reenroll edge-1" in message
    assert "--replace" in message
    assert "certificate" not in taken.json()
    replacing = server.client.post("/v1/enroll", json=_enroll_body(plain, "edge-1", replace=True))
    assert replacing.status_code == 403, replacing.text  # --replace alone is not the operator's consent
    assert "strata nodes reenroll edge-1" in replacing.json()["error"]
    assert server.client.get("/v1/health", headers=victim.headers).status_code == 200

    # Revoked, it stays revoked: a plain token does not bring it back either.
    assert server.client.delete(f"/v1/nodes/{victim.node_id}", headers=server.admin).status_code == 204
    assert server.client.post("/v1/enroll", json=_enroll_body(plain, "edge-1", replace=True)).status_code == 403
    assert server.client.get(f"/v1/nodes/{victim.node_id}", headers=server.admin).status_code == 404

    # A re-enrollment token enrolls that node only, and only with replace; refusals do not spend it.
    issued = server.client.post("/v1/reenrollment-tokens", json={"node": "edge-1"}, headers=server.admin)
    assert issued.status_code == 201
    token = issued.json()["token"]
    other = server.client.post("/v1/enroll", json=_enroll_body(token, "edge-2"))
    assert other.status_code == 403
    assert "re-enrolls node 'edge-1'" in other.json()["error"]
    unsaid = server.client.post("/v1/enroll", json=_enroll_body(token, "edge-1"))
    assert unsaid.status_code == 409
    assert "--replace" in unsaid.json()["error"]
    with caplog.at_level("WARNING", logger="strata.control.fleet"):
        back = server.client.post("/v1/enroll", json=_enroll_body(token, "edge-1", replace=True))
    assert back.status_code == 201
    assert back.json()["node_id"] == victim.node_id
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"node edge-1 ({victim.node_id}) re-keyed by a new enrollment (--replace): its previous credential is revoked"
    ]
    assert server.client.post("/v1/reenrollment-tokens", json={"node": "nope"}, headers=server.admin).status_code == 404

    # replace on a free name enrolls it as new (nothing to re-key, nothing logged).
    fresh = server.client.post("/v1/enroll", json=_enroll_body(_token(server), "edge-9", replace=True))
    assert fresh.status_code == 201


def test_a_bound_token_assigns_name_tier_and_labels(server: Harness) -> None:
    body = {"name": "gw-1", "tier": "near-edge", "labels": {"site": "berlin"}}
    token = _token(server, **body)
    wrong_tier = server.client.post("/v1/enroll", json=_enroll_body(token, "gw-1", tier="device"))
    assert wrong_tier.status_code == 403
    assert "near-edge" in wrong_tier.json()["error"]
    wrong_name = server.client.post("/v1/enroll", json=_enroll_body(token, "gw-2", tier="near-edge"))
    assert wrong_name.status_code == 403
    wrong_labels = server.client.post(
        "/v1/enroll", json=_enroll_body(token, "gw-1", tier="near-edge", labels={"site": "paris"})
    )
    assert wrong_labels.status_code == 403
    # Refusals do not spend the token; the node sends no labels and gets the token's.
    enrolled = server.client.post("/v1/enroll", json=_enroll_body(token, "gw-1", tier="near-edge"))
    assert enrolled.status_code == 201, enrolled.text
    view = server.client.get(f"/v1/nodes/{enrolled.json()['node_id']}", headers=server.admin).json()
    assert (view["tier"], view["labels"]) == ("near-edge", {"site": "berlin"})
    bad = server.client.post("/v1/enrollment-tokens", json={"tier": "fog"}, headers=server.admin)
    assert bad.status_code == 422


def test_an_unbound_token_assigns_nothing_the_node_asks_for(server: Harness) -> None:
    """A token that binds nothing (a leaked one, say) enrolls a device with no labels: what the machine asks for
    is its claim until the operator assigns it."""
    token = _token(server)
    body = _enroll_body(token, "intruder", tier="near-edge", labels={"site": "berlin"})
    enrolled = server.client.post("/v1/enroll", json=body)
    assert enrolled.status_code == 201, enrolled.text
    node_id = enrolled.json()["node_id"]
    view = server.client.get(f"/v1/nodes/{node_id}", headers=server.admin).json()
    assert (view["tier"], view["labels"]) == ("device", {})


def test_revoked_node_loses_access_at_once_and_leaves_the_inventory(server: Harness) -> None:
    node = server.enroll("edge-1")
    other = server.enroll("edge-2")
    assert server.client.get("/v1/health", headers=node.headers).status_code == 200  # credential now cached
    assert server.client.delete(f"/v1/nodes/{node.node_id}", headers=server.admin).status_code == 204
    assert server.client.get("/v1/health", headers=node.headers).status_code == 401
    assert server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=node.headers).status_code == 401
    assert [n["name"] for n in server.client.get("/v1/nodes", headers=server.admin).json()] == ["edge-2"]
    assert server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).status_code == 404
    assert server.client.delete(f"/v1/nodes/{node.node_id}", headers=server.admin).status_code == 404
    assert server.client.get("/v1/health", headers=other.headers).status_code == 200
    # The operator may enroll the machine again with a re-enrollment token; it keeps its id.
    again = server.enroll("edge-1", reenroll=True)
    assert again.node_id == node.node_id
    assert server.client.get("/v1/health", headers=again.headers).status_code == 200


@pytest.mark.parametrize("header", ["the enrollment token", "an unknown token", "the admin token"])
def test_an_enrollment_with_an_authorization_header_is_still_an_enrollment(server: Harness, header: str) -> None:
    # The route's credential is the token in its body; a client that also sends an Authorization header (the one
    # `GET /v1/ca` takes, or a stale default) still enrolls: a body with an unknown bearer token may be 64 KiB.
    issued = server.client.post(
        "/v1/enrollment-tokens", json={"name": "edge", "tier": "device", "labels": {}}, headers=server.admin
    )
    token = issued.json()["token"]
    admin = server.admin["Authorization"]
    authorization = {
        "the enrollment token": f"Bearer {token}",
        "an unknown token": "Bearer stale",
        "the admin token": admin,
    }
    body = {"token": token, "name": "edge", "tier": "device", "labels": {}, "profile": "cpu-generic"}
    body["csr"] = node_key_and_csr("edge")
    answer = server.client.post("/v1/enroll", json=body, headers={"Authorization": authorization[header]})
    assert answer.status_code == 201, answer.text
    padded = server.client.post(  # a made-up token buys no more than no token: 64 KiB
        "/v1/enroll",
        content=b" " * 70_000,
        headers={"Authorization": "Bearer stale", "Content-Type": "application/json"},
    )
    assert padded.status_code == 413, padded.text


def test_a_node_may_not_be_named_as_another_nodes_id(server: Harness) -> None:
    """Nodes are looked up by id or name: a node named as another's id (a device learns its parent's id from
    /topology) mixed its events and history into that node's."""
    victim = server.enroll("gw-1")
    token = server.client.post("/v1/enrollment-tokens", json={}, headers=server.admin).json()["token"]
    refused = server.client.post("/v1/enroll", json=_enroll_body(token, victim.node_id))
    assert refused.status_code in (400, 422), refused.text
    assert "looks like a node id" in refused.json()["error"]
    bound = server.client.post("/v1/enrollment-tokens", json={"name": victim.node_id}, headers=server.admin)
    assert bound.status_code in (400, 422), bound.text
    assert server.client.post("/v1/enroll", json=_enroll_body(token, "edge-7")).status_code == 201  # not spent
