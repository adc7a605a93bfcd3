"""Revocation reaches the tier ports: after `strata nodes revoke C`, C's certificate still chains to the fleet CA
and has not expired, so only the revocation list in every node's desired state stops other nodes from serving it.

Attack: with C's certificate and key, ask node A's tier port for an inference and for a relay piece, before and
after C is revoked, on a connection opened before the revocation too, and after A restarts without its control
plane.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from strata.core.package import pack_tar, package_pieces
from strata.examples.digits import load_data
from strata.localfleet import AgentHandle, LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow

X = load_data().test_x[:2]
INFER = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}


def as_node(fleet: LocalFleet, name: str) -> ssl.SSLContext:
    """A client context presenting node `name`'s certificate; node certificates name nodes, not hosts."""
    context = fleet.tls(name)
    context.check_hostname = False
    return context


def certificate_sha256(handle: AgentHandle) -> str:
    pem = (handle.data_dir / "trust" / "node.pem").read_text()
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def tier_port_answers(fleet: LocalFleet, near: AgentHandle) -> bool:
    try:
        return httpx.get(f"{near.tier_url}/v2/health/live", verify=as_node(fleet, "near"), timeout=2).is_success
    except httpx.HTTPError:
        return False


def tier_calls(client: httpx.Client, near: AgentHandle, relay_path: str) -> tuple[httpx.Response, httpx.Response]:
    """An inference and a relay piece asked of the near-edge node's tier port."""
    infer = client.post(f"{near.tier_url}/v2/models/digits/infer", json=INFER)
    piece = client.get(f"{near.tier_url}{relay_path}")
    return infer, piece


def test_a_revoked_certificate_is_refused_on_every_peer_tier_port(
    fleet: LocalFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    site = {"site": "a"}
    near = fleet.start_agent("near", "near-edge", site)
    device = fleet.start_agent("device", "device", site)
    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    pack_tar(package, tmp_path / "digits.tar")
    fleet.client.push_package(tmp_path / "digits.tar")
    fleet.client.deploy("digits", "1", site)
    fleet.wait_for_versions({"near": {"digits": "1"}, "device": {"digits": "1"}})
    fleet.wait_for(lambda: tier_port_answers(fleet, near), 30, "the tier port", near.process)
    digest = package.manifest.digest.removeprefix("sha256:")
    relay_path = f"/relay/v1/blobs/sha256/{package_pieces(package.manifest)[-1]}?package={digest}"
    revoked_hash = certificate_sha256(device)

    # Before: the device's certificate gets answers from the near-edge node's tier port.
    before = httpx.Client(verify=as_node(fleet, "device"), timeout=10)  # kept open across the revocation
    infer, piece = tier_calls(before, near, relay_path)
    assert (infer.status_code, piece.status_code) == (200, 200), (infer.text, piece.text[:200])

    revoked = subprocess.run(
        fleet.strata("nodes", "revoke", "device", "--server", fleet.server_url, "--token", fleet.admin_token),
        capture_output=True,
        text=True,
        env=fleet._env(),
        timeout=60,
        check=False,
    )
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()

    # After: within one long poll round trip, both are refused with a reason, on new connections and on the one
    # opened before the revocation; the near-edge node's own certificate is still served.
    def refused() -> bool:
        with httpx.Client(verify=as_node(fleet, "device"), timeout=10) as fresh:
            return {r.status_code for r in tier_calls(fresh, near, relay_path)} == {403}

    fleet.wait_for(refused, 10, "the near-edge node to refuse the revoked certificate", near.process)
    print(f"\nrevocation reached the near-edge tier port in {time.monotonic() - started:.2f}s")
    for response in tier_calls(before, near, relay_path):
        assert response.status_code == 403
        assert "revoked" in response.json()["error"]
    before.close()
    with httpx.Client(verify=as_node(fleet, "near"), timeout=10) as itself:
        assert itself.post(f"{near.tier_url}/v2/models/digits/infer", json=INFER).status_code == 200
    desired = json.loads((near.data_dir / "desired.json").read_text())
    assert revoked_hash in desired["state"]["revoked_certificates"]

    # A near-edge node restarted while its control plane is away still refuses the revoked certificate.
    fleet.stop_server()
    near = fleet.restart_agent("near")
    fleet.wait_for(lambda: tier_port_answers(fleet, near), 30, "the tier port", near.process)
    with httpx.Client(verify=as_node(fleet, "device"), timeout=10) as offline:
        infer, piece = tier_calls(offline, near, relay_path)
    assert (infer.status_code, piece.status_code) == (403, 403), (infer.text, piece.text[:200])
    with httpx.Client(verify=as_node(fleet, "near"), timeout=10) as itself:
        assert itself.post(f"{near.tier_url}/v2/models/digits/infer", json=INFER).status_code == 200
