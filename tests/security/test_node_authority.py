"""A node, a token holder and a read-only operator stay inside what they were given (issue 11: finding 1 and the
control plane's extra items), attacked the way the review did: real control plane and agent processes, each
node's own certificate on the wire."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest

from strata.core.package import pack_tar, package_pieces
from strata.localfleet import LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

# Certificates are public (and their folders are private all the same).
PUBLIC = {"ca.pem", "server.pem"}


def node_id(fleet: LocalFleet, name: str) -> str:
    return fleet.node_id(name)


def admin(fleet: LocalFleet) -> dict[str, str]:
    return {"authorization": f"Bearer {fleet.admin_token}"}


def push(fleet: LocalFleet, model: Path, name: str, workdir: Path) -> None:
    package = build_package(model, workdir / f"pkg-{name}", name=name, version="1")
    pack_tar(package, workdir / f"{name}.tar")
    fleet.client.push_package(workdir / f"{name}.tar")


def blobs_of(fleet: LocalFleet, node: str) -> list[str]:
    """The blobs a node's desired state names (as the operator reads it)."""
    url = f"{fleet.server_url}/v1/nodes/{node_id(fleet, node)}/desired"
    desired = httpx.get(url, headers=admin(fleet), verify=fleet.tls()).json()
    return [variant["blob"] for model in desired["models"] for variant in model["variants"]]


def test_a_node_cannot_promote_itself_to_reach_another_nodes_model_or_traffic(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    """Finding 1: a node rewrote its tier and labels in its status report, then read a private model of another
    site and was named parent of that site's devices. Now what it says about itself is a claim, shown as such."""
    fleet.start_agent("victim", "device", {"site": "berlin"})
    fleet.start_agent("parent", "near-edge", {"site": "berlin"})
    rogue = fleet.start_agent("rogue", "device", {"site": "paris"})
    fleet.wait_for(lambda: len(fleet.nodes()) == 3, 30, "three nodes")
    push(fleet, digits_onnx, "private", tmp_path)
    fleet.client.deploy("private", "1", {"site": "berlin"})
    fleet.wait_for_versions({"victim": {"private": "1"}, "parent": {"private": "1"}, "rogue": {}}, timeout=90)
    (blob,) = blobs_of(fleet, "victim")[:1]
    victim_id, rogue_id = node_id(fleet, "victim"), node_id(fleet, "rogue")
    as_rogue = fleet.tls("rogue")
    blob_url = f"{fleet.server_url}/v1/blobs/sha256/{blob}"
    assert httpx.get(blob_url, verify=as_rogue).status_code == 403

    # The rogue's agent is stopped (a modified agent would just not report the truth) and its certificate speaks.
    rogue.process.stop()
    claim: dict[str, Any] = {
        "tier": "near-edge",
        "labels": {"site": "berlin"},
        "profile": fleet.nodes()["rogue"]["profile"],
        "serve_url": "https://127.0.0.1:1",
    }
    put = httpx.put(f"{fleet.server_url}/v1/nodes/{rogue_id}/status", json=claim, verify=as_rogue)
    assert put.status_code == 204

    assert httpx.get(blob_url, verify=as_rogue).status_code == 403
    for piece in (blob, *blobs_of(fleet, "victim")):
        assert httpx.head(f"{fleet.server_url}/v1/blobs/sha256/{piece}", verify=as_rogue).status_code == 403
    access = httpx.get(f"{fleet.server_url}/v1/nodes/{victim_id}/packages/{'0' * 64}", verify=as_rogue)
    assert access.status_code == 403
    own = httpx.get(f"{fleet.server_url}/v1/nodes/{rogue_id}/desired", verify=as_rogue).json()
    assert own["models"] == []
    topology = httpx.get(f"{fleet.server_url}/v1/nodes/{victim_id}/topology", headers=admin(fleet), verify=fleet.tls())
    parents = [endpoint["name"] for endpoint in topology.json()["parents"]]
    assert parents == ["parent"]

    # The operator sees the claim apart from what it assigned.
    view = fleet.nodes()["rogue"]
    assert (view["tier"], view["labels"]) == ("device", {"site": "paris"})
    assert view["claims"] == {"tier": "near-edge", "labels": {"site": "berlin"}}

    # Only the operator changes a node's labels: then the node gets the model (and nothing else changed it).
    labelled = fleet.cli("nodes", "label", "rogue", "site=berlin")
    assert labelled.returncode == 0, labelled.stderr
    assert fleet.nodes()["rogue"]["labels"] == {"site": "berlin"}
    assert httpx.get(blob_url, verify=as_rogue).status_code == 200


def test_a_plain_enrollment_token_cannot_take_over_a_node(fleet: LocalFleet, tmp_path: Path) -> None:
    """Extra item: any enrollment token re-enrolled an existing node by name, lifting its revocation and replacing
    its credential. Now that takes a re-enrollment token the operator issues for that node."""
    victim = fleet.start_agent("victim", "device", {"site": "berlin"})
    fleet.wait_for(lambda: "victim" in fleet.nodes(), 30, "the victim to enroll")
    # The server lists it once it enrolled it, a moment before the agent has written its credential (the identity
    # file last): waited for, or a busy machine reads no certificate yet.
    fleet.wait_for((victim.data_dir / "trust" / "identity.json").exists, 30, "the victim's credential", victim.process)
    before = (victim.data_dir / "trust" / "node.pem").read_text()
    fleet.cli("nodes", "revoke", "victim")
    thief = fleet.start_agent("victim-copy", "device", {"site": "berlin"}, data_dir=tmp_path / "thief",
                              node_name="victim")  # fmt: skip
    fleet.wait_for(lambda: "strata nodes reenroll victim" in thief.process.log_tail(50), 30, "refusal", thief.process)
    assert not (tmp_path / "thief" / "trust" / "node.pem").exists()
    assert "victim" not in fleet.nodes()  # still revoked
    assert (victim.data_dir / "trust" / "node.pem").read_text() == before

    issued = fleet.cli("nodes", "reenroll", "victim")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip().splitlines()[-1]
    thief.process.stop()
    # Even with the operator's token, re-keying a name needs the agent's --replace: said loudly, or refused (409).
    unsaid = fleet.start_agent("victim-copy", "device", {"site": "berlin"}, data_dir=tmp_path / "thief",
                               node_name="victim", enroll_token=token)  # fmt: skip
    fleet.wait_for(lambda: not unsaid.process.running, 30, "the refusal")
    assert unsaid.process.stop() == 3, unsaid.process.log_tail()
    assert "pass --replace to `strata agent`" in unsaid.process.log_tail(50)
    back = fleet.start_agent("victim-copy", "device", {"site": "berlin"}, data_dir=tmp_path / "thief",
                             node_name="victim", enroll_token=token, extra_args=["--replace"])  # fmt: skip
    fleet.wait_for(lambda: "victim" in fleet.nodes(), 30, "the re-enrollment", back.process)
    assert fleet.nodes()["victim"]["labels"] == {"site": "berlin"}
    assert "WARNING" in back.process.log_tail(50)
    assert "enrolling with --replace" in back.process.log_tail(50)
    server_log = (fleet.root / "logs" / "server.log").read_text()
    assert "node victim (" in server_log
    assert "re-keyed by a new enrollment (--replace)" in server_log


def test_the_control_planes_files_are_private_and_a_read_token_gets_no_weights(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    """Extra items: the data folder, strata.db and blobs were 0755/0644 under a default umask; a read-only token
    downloaded every package."""
    push(fleet, digits_onnx, "digits", tmp_path)
    server_dir = fleet.server_dir
    loose = []
    for root, folders, files in os.walk(server_dir):
        for name in [*folders, *files]:
            path = Path(root) / name
            if path.is_symlink():
                continue
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077 and path.name not in PUBLIC:
                loose.append(f"{path.relative_to(server_dir)} {oct(mode)}")
    assert stat.S_IMODE(server_dir.stat().st_mode) == 0o700
    assert not loose, loose
    assert (server_dir / "strata.db").exists()

    created = fleet.cli("token", "api", "--scope", "read")
    assert created.returncode == 0, created.stderr
    reader = {"authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
    models = httpx.get(f"{fleet.server_url}/v1/models", headers=reader, verify=fleet.tls())
    assert models.status_code == 200
    blobs = sorted((server_dir / "blobs" / "sha256").rglob("*"))
    blob = next(p.name for p in blobs if p.is_file())
    refused = httpx.get(f"{fleet.server_url}/v1/blobs/sha256/{blob}", headers=reader, verify=fleet.tls())
    assert refused.status_code == 403
    assert "read-only token" in refused.json()["error"]
    allowed = httpx.get(f"{fleet.server_url}/v1/blobs/sha256/{blob}", headers=admin(fleet), verify=fleet.tls())
    assert allowed.status_code == 200


def test_a_relay_node_reports_a_tampered_piece_as_a_failure(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    """Extra item: a near-edge node (which downloads through its own relay) refused a piece whose bytes changed on
    the server, and said so only in its log: the control plane showed it out of sync, with no failure."""
    gateway = fleet.start_agent("gw", "near-edge", {"site": "lab"})
    fleet.wait_for(lambda: "serving other tiers" in gateway.process.log_tail(50), 60, "the relay", gateway.process)
    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    pack_tar(package, tmp_path / "digits.tar")
    fleet.client.push_package(tmp_path / "digits.tar")
    changed = []
    for piece in package_pieces(package.manifest)[1:]:  # the manifest is its own digest: leave it
        path = fleet.server_dir / "blobs" / "sha256" / piece[:2] / piece[2:4] / piece
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        changed.append(piece)
    fleet.client.deploy("digits", "1", {"site": "lab"})

    def reported() -> dict[str, Any] | None:
        return next((f for f in fleet.nodes()["gw"]["failures"] if f["model"] == "digits"), None)

    failure = fleet.wait_for(reported, 60, "the relay node to report the refusal", gateway.process)
    assert failure["kind"] == "download"
    assert "do not match their name" in failure["reason"]
    assert any(piece in failure["reason"] for piece in changed)
    assert fleet.nodes()["gw"]["models"] == {}
