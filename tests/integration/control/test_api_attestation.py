"""Attestation: a nonce, a report signed with the node key over mutual TLS, the release allowlist, and policies
that require an attested node."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from control_harness import Harness, NodeCredentials
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from strata.core.attest import Report, strata_code_hash
from strata.core.package import tar_bytes
from strata.core.policy import Policy
from strata.package_build import build_package


def report_for(server: Harness, node: NodeCredentials, code: str | None = None, nonce: str | None = None) -> Report:
    if nonce is None:
        challenge = server.client.post(f"/v1/nodes/{node.node_id}/attestation/challenge", headers=node.headers)
        assert challenge.status_code == 200, challenge.text
        nonce = challenge.json()["nonce"]
    return Report(node.node_id, nonce, code or strata_code_hash(), "sha256:cfg", ("sha256:" + "a" * 64,), "boot", 1.0)


def send(server: Harness, node: NodeCredentials, report: Report, key: ec.EllipticCurvePrivateKey | None = None) -> Any:
    signer = key or node.key
    assert signer is not None
    signature = base64.b64encode(signer.sign(report.payload(), ec.ECDSA(hashes.SHA256()))).decode()
    return server.client.post(
        f"/v1/nodes/{node.node_id}/attestation",
        json={"report": report.to_json(), "signature": signature},
        headers=node.headers,
    )


def test_a_node_running_the_release_is_attested(server: Harness) -> None:
    node = server.enroll("edge")
    answer = send(server, node, report_for(server, node))
    assert answer.status_code == 200, answer.text
    assert answer.json()["attested"] is True
    assert answer.json()["level"] == "software"
    assert answer.json()["reason"] == "agent code and 1 active package attested"  # its one package, not "1 ...s"
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert view["attestation"] == "software"


def test_changed_agent_code_fails_attestation(server: Harness) -> None:
    node = server.enroll("edge")
    assert send(server, node, report_for(server, node)).json()["attested"] is True
    answer = send(server, node, report_for(server, node, code="sha256:" + "b" * 64)).json()
    assert answer["attested"] is False
    assert "allowlist" in answer["reason"]
    view = server.client.get(f"/v1/nodes/{node.node_id}", headers=server.admin).json()
    assert view["attestation"] is None


def test_replayed_or_foreign_reports_are_refused(server: Harness) -> None:
    node = server.enroll("edge")
    report = report_for(server, node)
    assert send(server, node, report).json()["attested"] is True
    replayed = send(server, node, report).json()  # the nonce is spent
    assert replayed["attested"] is False
    assert "nonce" in replayed["reason"]
    # Signed by a key other than the certificate's: refused outright.
    stranger = ec.generate_private_key(ec.SECP256R1())
    assert send(server, node, report_for(server, node), key=stranger).status_code == 401
    # Signed by another node's key: refused outright too.
    other = server.enroll("other")
    assert send(server, node, report_for(server, node), key=other.key).status_code == 401


def test_a_model_that_requires_attestation_reaches_attested_nodes_only(
    server: Harness, digits_onnx: Path, tmp_path: Path, make_package: Callable[..., bytes]
) -> None:
    policy = Policy.from_json(yaml.safe_load("required_attestation: software"))
    package = build_package(digits_onnx, tmp_path / "pkg", name="secret", version="1", policy=policy.to_json())
    assert server.upload(tar_bytes(package)).status_code == 201
    server.deploy("secret", "1")
    honest = server.enroll("honest")
    tampered = server.enroll("tampered")
    assert send(server, honest, report_for(server, honest)).json()["attested"] is True
    assert send(server, tampered, report_for(server, tampered, code="sha256:" + "c" * 64)).json()["attested"] is False
    assert [m["name"] for m in server.desired(honest).json()["models"]] == ["secret"]
    assert server.desired(tampered).json()["models"] == []


def test_a_node_flipping_its_verdict_cannot_wake_the_whole_fleet_each_time(server: Harness) -> None:
    """A changed verdict wakes every long poll and recomputes every node's desired state; a node holding the
    release (it passes) and sending a report that fails could flip its verdict as fast as it can call."""
    node = server.enroll("edge")
    generation = server.plane.feed.generation
    for _ in range(5):
        assert send(server, node, report_for(server, node)).json()["attested"] is True
        assert send(server, node, report_for(server, node, code="sha256:" + "b" * 64)).json()["attested"] is False
    assert server.plane.feed.generation - generation <= 2  # at once, then once at the end of the interval
