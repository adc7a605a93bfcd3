"""The revocation list in every node's desired state: which certificates are on it, and for how long.

Revoking a node lists every certificate of it still valid (renewal keeps the previous one valid, so both); enrolling
a node again lists the certificate it had; a certificate drops off once it expires. The real processes refusing
what is listed are tested in tests/security/test_revoked_peers.py.
"""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

from control_harness import Harness, NodeCredentials, csr_for
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from strata.control.db import NodeCertificate


def life(server: Harness) -> float:
    """A node certificate's life in seconds (the server's setting)."""
    return server.plane.settings.node_cert_hours * 3600


def sha256_of(certificate: str) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(certificate)).hexdigest()


def desired(server: Harness, node: NodeCredentials) -> dict[str, Any]:
    response = server.client.get(f"/v1/nodes/{node.node_id}/desired", headers=node.headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def listed(server: Harness, node: NodeCredentials) -> set[str]:
    return set(desired(server, node).get("revoked_certificates", []))


def test_revoking_lists_the_current_and_the_previous_certificate_until_they_expire(server: Harness) -> None:
    watcher = server.enroll("watcher")
    edge = server.enroll("edge")
    etag = server.client.get(f"/v1/nodes/{watcher.node_id}/desired", headers=watcher.headers).headers["etag"]
    assert "revoked_certificates" not in desired(server, watcher)  # nothing revoked: the shape it always had

    server.clock.advance(life(server) * 2 / 3)  # a third of the life left: the agent renews
    renewed = server.client.post(
        f"/v1/nodes/{edge.node_id}/certificate", json={"csr": csr_for(edge.key, "edge")}, headers=edge.headers
    ).json()["certificate"]
    assert listed(server, watcher) == set()  # renewal revokes nothing
    assert server.client.delete(f"/v1/nodes/{edge.node_id}", headers=server.admin).status_code == 204

    both = {sha256_of(edge.certificate), sha256_of(renewed)}
    assert listed(server, watcher) == both
    answer = server.client.get(
        f"/v1/nodes/{watcher.node_id}/desired", headers={**watcher.headers, "If-None-Match": etag}
    )
    assert answer.status_code == 200
    assert answer.headers["etag"] != etag  # a waiting poll would answer at once

    server.clock.advance(life(server) / 3 + 1)  # the first certificate expired; the renewed one has 2/3 left
    server.enroll("newcomer")  # any fleet change recomputes desired states
    assert listed(server, watcher) == {sha256_of(renewed)}
    server.clock.advance(life(server) * 2 / 3)
    server.enroll("another")
    assert listed(server, watcher) == set()
    with server.plane.db.transaction() as session:  # and expired certificates are forgotten
        assert (
            session.scalar(
                select(func.count()).select_from(NodeCertificate).where(NodeCertificate.node_id == edge.node_id)
            )
            == 0
        )


def test_enrolling_a_node_again_lists_the_certificate_it_had(server: Harness) -> None:
    watcher = server.enroll("watcher")
    first = server.enroll("edge")
    second = server.enroll("edge", reenroll=True)  # the operator re-enrolls it: a new machine, or a new key
    assert second.node_id == first.node_id
    assert listed(server, watcher) == {sha256_of(first.certificate)}
    assert listed(server, second) == {sha256_of(first.certificate)}  # the node itself learns it too


def test_a_certificate_issued_before_certificates_were_recorded_is_listed_on_revocation(server: Harness) -> None:
    watcher = server.enroll("watcher")
    edge = server.enroll("edge")
    with server.plane.db.transaction() as session:  # as after the upgrade that added the table
        session.query(NodeCertificate).filter(NodeCertificate.node_id == edge.node_id).delete()
    assert server.client.delete(f"/v1/nodes/{edge.node_id}", headers=server.admin).status_code == 204
    assert listed(server, watcher) == {sha256_of(edge.certificate)}
    server.clock.advance(life(server) + 1)  # listed for at most a certificate's life
    server.enroll("newcomer")
    assert listed(server, watcher) == set()


def test_a_reenrollment_token_issued_before_a_revocation_does_not_undo_it(server: Harness) -> None:
    """A re-enrollment token issued, then the node revoked (stolen, say): the token brought the node back with its
    tier and labels. Bringing it back takes a token issued after the revocation."""
    node_id = server.enroll("stolen", labels={"site": "berlin"}).node_id
    early = server.client.post("/v1/reenrollment-tokens", json={"node": "stolen"}, headers=server.admin)
    assert early.status_code == 201, early.text
    assert server.client.delete(f"/v1/nodes/{node_id}", headers=server.admin).status_code == 204
    key = ec.generate_private_key(ec.SECP256R1())
    body = {"name": "stolen", "tier": "device", "labels": {}, "profile": "cpu-generic", "replace": True}
    refused = server.client.post("/v1/enroll", json={**body, "token": early.json()["token"], "csr": csr_for(key, "x")})
    assert refused.status_code == 401, refused.text
    again = server.enroll("stolen", reenroll=True)  # a token issued now does bring it back
    assert again.node_id == node_id
