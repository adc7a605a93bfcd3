"""Zero trust between tiers, with real processes: every refusal ends in a clear error, the node still serving the
model it had, and nothing lost.

Connections without a fleet certificate, with one from another CA, an expired or a revoked one; enrollment tokens
used twice or past their expiry; model files read off a node's disk; an agent whose code was changed.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import onnxruntime as ort
import pytest
from e2e_helpers import push_model

from strata.agent.main import EXIT_ENROLLMENT
from strata.core.package import pack_tar
from strata.examples.digits import load_data
from strata.localfleet import AgentHandle, LocalFleet
from strata.package_build import build_package
from strata.trust.ca import FleetCA
from strata.trust.node import make_csr

pytestmark = pytest.mark.slow

X = load_data().test_x[:4]
SRC = Path(__file__).resolve().parents[2] / "src" / "strata"


def serves(handle: AgentHandle, version: str) -> bool:
    """The node answers an inference with `version` of the digits model."""
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}
    response = httpx.post(f"{handle.serve_url}/v2/models/digits/infer", json=body, timeout=10)
    return response.status_code == 200 and response.json()["model_version"] == version


def node_id(handle: AgentHandle) -> str:
    return str(json.loads((handle.data_dir / "trust" / "identity.json").read_text())["node_id"])


def context_with(fleet: LocalFleet, cert_pem: bytes, key: Path, folder: Path) -> ssl.SSLContext:
    """A client context trusting the fleet CA and presenting `cert_pem` over `key`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert_pem)
    context = fleet.tls()
    context.load_cert_chain(folder / "cert.pem", key)
    return context


def exit_status(handle: AgentHandle, timeout: float = 30) -> int:
    """Wait for an agent that must exit on its own; its exit status."""
    assert handle.process.popen is not None
    return handle.process.popen.wait(timeout)


def refused(call: object) -> str:
    """Run an HTTPS call that must be refused: the TLS handshake fails, or the server answers 401/403.
    Returns what the refusal said."""
    assert callable(call)
    try:
        response = call()
    except httpx.HTTPError as exc:  # the handshake was refused
        return str(exc)
    assert response.status_code in (401, 403), response.text
    return str(response.json()["error"])


def test_callers_without_a_valid_fleet_certificate_are_refused(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    edge = fleet.start_agent("edge", labels={"site": "a"})
    near = fleet.start_agent("near", tier="near-edge", labels={"site": "a"})
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"edge": {"digits": "1"}, "near": {"digits": "1"}})
    edge_id = node_id(edge)
    desired = f"{fleet.server_url}/v1/nodes/{edge_id}/desired"

    # Plain HTTP to the control plane is not served.
    with pytest.raises(httpx.HTTPError):
        httpx.get(desired.replace("https://", "http://"), timeout=5)
    # No client certificate: the server knows no caller.
    answer = httpx.get(desired, verify=fleet.tls(), timeout=5)
    assert answer.status_code == 401
    assert "certificate" in answer.json()["error"]

    # A certificate from another CA for the same node id (over the node's own key): the handshake fails.
    key = edge.data_dir / "trust" / "node.key"
    csr = make_csr(key, "edge")
    now = dt.datetime.now(dt.UTC)
    rogue = FleetCA.create("rogue CA", now).sign_node_csr(csr, edge_id, now)
    rogue_tls = context_with(fleet, rogue.pem, key, tmp_path / "rogue")
    print("other CA:", refused(lambda: httpx.get(desired, verify=rogue_tls, timeout=5)))

    # A certificate the fleet CA issued, but expired: the handshake fails.
    fleet_ca = FleetCA.load_or_create(fleet.server_dir / "pki", now)
    expired = fleet_ca.sign_node_csr(csr, edge_id, now - dt.timedelta(days=2), hours=1)
    expired_tls = context_with(fleet, expired.pem, key, tmp_path / "expired")
    print("expired:", refused(lambda: httpx.get(desired, verify=expired_tls, timeout=5)))

    # The near-edge tier listener accepts fleet certificates only: none, another CA's, an expired one all fail.
    ready = f"{near.tier_url}/v2/health/ready"
    for context in (fleet.tls(), rogue_tls, expired_tls):
        with pytest.raises(httpx.HTTPError):
            httpx.get(ready, verify=context, timeout=5)
    as_edge = fleet.tls("edge")
    as_edge.check_hostname = False  # node certificates name nodes (URIs), not hosts
    assert httpx.get(ready, verify=as_edge, timeout=5).status_code == 200

    # The node's own certificate still works, and both nodes kept serving throughout.
    assert httpx.get(desired, verify=fleet.tls("edge"), timeout=5).status_code == 200
    assert serves(edge, "1")
    assert serves(near, "1")


def test_a_revoked_node_is_cut_off_at_once_and_keeps_serving(
    fleet: LocalFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    edge = fleet.start_agent("edge", labels={"site": "a"})
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    as_edge = fleet.tls("edge")
    desired = f"{fleet.server_url}/v1/nodes/{node_id(edge)}/desired"

    revoked = subprocess.run(
        fleet.strata("nodes", "revoke", "edge", "--server", fleet.server_url, "--token", fleet.admin_token),
        capture_output=True,
        text=True,
        env=fleet._env(),
        timeout=60,
        check=False,
    )
    assert revoked.returncode == 0, revoked.stderr
    answer = httpx.get(desired, verify=as_edge, timeout=5)
    assert answer.status_code == 401
    assert "revoked" in answer.json()["error"]

    push_model(fleet, digits_onnx_v2, "2", tmp_path)
    fleet.client.deploy("digits", "2", {"site": "a"})
    fleet.wait_for(
        lambda: "revoked" in edge.process.log_tail(40), 40, "the agent to be told it was revoked", edge.process
    )
    assert serves(edge, "1")  # the old model still serves; the new one never reaches a revoked node
    assert "edge" not in fleet.nodes()
    # the operator looks for it: the answer says why it is not there (it said only "there is no node 'edge'")
    shown = fleet.cli("nodes", "show", "edge")
    assert shown.returncode == 6
    said = " ".join(shown.stderr.split())
    assert "node 'edge' was revoked: `strata nodes reenroll edge` makes a token that enrolls it again" in said


def test_a_revoked_node_is_told_how_to_enroll_again_and_is_back_once_it_does(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    """New-user trial: the README's agent line run again after `strata nodes revoke` (the same data dir, a
    `strata nodes reenroll` token) logged only "refused this node's credential" every minute: the stored identity
    won, the token went unused, and nothing said so. The agent now says that the token is not used and how to
    enroll again; done that way (an empty data dir: a new key, the old one may be a thief's), the node is back."""
    edge = fleet.start_agent("edge", labels={"site": "a"})
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    assert "enrolled already" not in edge.process.log_tail(1000)  # it enrolled with its token just now
    assert fleet.cli("nodes", "revoke", "edge").returncode == 0
    issued = fleet.cli("nodes", "reenroll", "edge")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip().splitlines()[-1]

    edge.process.stop()  # refused already, maybe: what the agent started again says is read from here on
    before = edge.process.log_path.stat().st_size
    same = fleet.start_agent("edge", enroll=False, extra_args=["--enroll-token", token, "--replace"])

    def said() -> str:
        return " ".join(same.process.log_path.read_bytes()[before:].decode(errors="replace").split())

    fleet.wait_for(lambda: "strata nodes reenroll edge" in said(), 30, "the refusal to say what to do", same.process)
    assert "enrolled already" in said()
    assert "--enroll-token is not used" in said()
    assert "edge" not in fleet.nodes()

    same.process.stop()
    old_key = (same.data_dir / "trust" / "node.key").read_bytes()
    fresh = fleet.start_agent(
        "edge", enroll=False, data_dir=tmp_path / "fresh", extra_args=["--enroll-token", token, "--replace"]
    )
    fleet.wait_for(lambda: "edge" in fleet.nodes(), 30, "the node to enroll again", fresh.process)
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    assert serves(fresh, "1")
    assert (fresh.data_dir / "trust" / "node.key").read_bytes() != old_key


def test_a_node_whose_certificate_expired_is_refused_and_keeps_serving(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    edge = fleet.start_agent("edge", labels={"site": "a"})
    push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    edge.process.stop()

    # The node's certificate is swapped for one the fleet CA issued but that expired (a node that was off for
    # longer than its certificate's life): the agent says so and serves on; the control plane would refuse it.
    trust = edge.data_dir / "trust"
    now = dt.datetime.now(dt.UTC)
    expired = FleetCA.load_or_create(fleet.server_dir / "pki", now).sign_node_csr(
        make_csr(trust / "node.key", "edge"), node_id(edge), now - dt.timedelta(days=2), hours=1
    )
    (trust / "node.pem").write_bytes(expired.pem)
    state = json.loads((trust / "identity.json").read_text())
    (trust / "identity.json").write_text(json.dumps({**state, "not_after": expired.not_after}))
    edge = fleet.restart_agent("edge")
    fleet.wait_for(lambda: fleet.agent_live("edge") and serves(edge, "1"), 30, "the node to serve again")
    fleet.wait_for(
        lambda: "expired" in edge.process.log_tail(40), 40, "the refusal to reach the agent's log", edge.process
    )
    assert serves(edge, "1")
    assert list((edge.data_dir / "packages").iterdir())  # nothing was removed


def test_enrollment_tokens_are_one_time_and_expire(fleet: LocalFleet, tmp_path: Path) -> None:
    token = str(fleet.client.create_enrollment_token(600)["token"])
    first = fleet.start_agent("first", enroll=False, extra_args=["--enroll-token", token])
    fleet.wait_for(lambda: "first" in fleet.nodes(), 30, "the first node to enroll", first.process)

    again = fleet.start_agent("again", enroll=False, extra_args=["--enroll-token", token])
    assert exit_status(again) == EXIT_ENROLLMENT
    assert "invalid, used or expired" in again.process.log_tail(20)
    # Refused, it never served: it said "serving the Open Inference Protocol on ..." before finding out.
    assert "serving the Open Inference Protocol" not in again.process.log_tail(1000)
    fleet.wait_for(
        lambda: "serving the Open Inference Protocol" in first.process.log_tail(1000),
        10,
        "the enrolled node to say it serves",
    )

    issued = fleet.client.create_enrollment_token(1)
    short = str(issued["token"])
    fleet.wait_for(lambda: time.time() > float(issued["expires_at"]) + 0.5, 10, "the short token to expire")
    late = fleet.start_agent("late", enroll=False, extra_args=["--enroll-token", short])
    assert exit_status(late) == EXIT_ENROLLMENT
    assert "invalid, used or expired" in late.process.log_tail(20)
    assert set(fleet.nodes()) == {"first"}
    assert not (late.data_dir / "trust" / "identity.json").exists()


def test_a_model_file_read_off_a_nodes_disk_is_not_a_loadable_model(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    edge = fleet.start_agent("edge", labels={"site": "a"})
    package = push_model(fleet, digits_onnx, "1", tmp_path)
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"edge": {"digits": "1"}})
    model_on_disk = next((edge.data_dir / "packages").glob("*/model.onnx")).read_bytes()
    plain = package.model_path.read_bytes()
    assert model_on_disk.startswith(b"SENC1")
    assert len(model_on_disk) == len(plain) + 33  # magic, nonce and tag: the rest is ciphertext
    assert plain[100:2000] not in model_on_disk
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|invalid|load"):
        ort.InferenceSession(model_on_disk, providers=["CPUExecutionProvider"])
    for leftover in (edge.data_dir / "downloads").rglob("*"):
        assert not leftover.is_file() or leftover.read_bytes()[:5] in (b"", b"SENC1")
    assert serves(edge, "1")  # the node decrypts in memory only


def test_changed_agent_code_fails_attestation_and_gets_no_model_that_requires_it(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    tampered_src = tmp_path / "tampered"
    shutil.copytree(SRC, tampered_src / "strata", ignore=shutil.ignore_patterns("__pycache__"))
    loop = tampered_src / "strata" / "agent" / "loop.py"
    loop.write_text(loop.read_text() + "\n# a change nobody released\n")

    honest = fleet.start_agent("honest", labels={"site": "a"})
    tampered = fleet.start_agent("tampered", labels={"site": "a"}, env={"PYTHONPATH": str(tampered_src)})

    def verdicts() -> dict[str, object] | None:
        nodes = fleet.nodes()
        if {"honest", "tampered"} <= set(nodes) and all(n.get("attestation_detail") for n in nodes.values()):
            return nodes
        return None

    nodes = fleet.wait_for(verdicts, 60, "both nodes to attest")
    assert nodes["honest"]["attestation"] == "software"
    assert nodes["tampered"]["attestation"] is None
    assert "not on the release allowlist" in nodes["tampered"]["attestation_detail"]

    package = build_package(
        digits_onnx,
        tmp_path / "secret",
        name="digits",
        version="1",
        policy={"required_attestation": "software"},
    )
    pack_tar(package, tmp_path / "secret.tar")
    fleet.client.push_package(tmp_path / "secret.tar")
    fleet.client.deploy("digits", "1", {"site": "a"})
    fleet.wait_for_versions({"honest": {"digits": "1"}, "tampered": {}})
    assert serves(honest, "1")
    assert fleet.agent_live("tampered")
    assert not list((tampered.data_dir / "packages").iterdir())  # not even downloaded
    assert len(fleet.nodes()) == 2
