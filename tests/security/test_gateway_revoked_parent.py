"""A node's gateway stops sending to a parent the fleet revoked, and keeps refusing it while the control plane is
away.

Real control plane, real agents, a real `strata gateway --data-dir` acting as device `dev1`: its parent, the
near-edge node `edge1`, serves the digits model. The operator revokes edge1 (`strata nodes revoke`); edge1's
certificate still chains to the fleet CA and has not expired, and edge1 keeps answering on its tier port. Once
dev1's agent has saved the revocation list (`desired.json`), the control plane is stopped: the gateway, which
read its topology (naming edge1) before and cannot read it again, must send nothing more to edge1.
"""

from __future__ import annotations

import hashlib
import json
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from strata.core.oip import encode_request
from strata.core.package import pack_tar
from strata.examples.digits import load_data
from strata.localfleet import AgentHandle, GatewayHandle, LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow


def certificate_sha256(handle: AgentHandle) -> str:
    pem = (handle.data_dir / "trust" / "node.pem").read_text()
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def revoked_list(handle: AgentHandle) -> list[str]:
    try:
        desired = json.loads((handle.data_dir / "desired.json").read_text())
    except (OSError, ValueError):
        return []
    return list(desired["state"].get("revoked_certificates", []))


def ask(gateway: GatewayHandle) -> httpx.Response:
    body, length = encode_request({"X": load_data().test_x[:1].astype(np.float32)})
    headers = {"inference-header-content-length": str(length)}
    return httpx.post(f"{gateway.url}/v2/models/digits/infer", content=body, headers=headers, timeout=30)


def test_a_revoked_parent_gets_nothing_even_while_the_control_plane_is_away(tmp_path: Path, digits_onnx: Path) -> None:
    with LocalFleet(tmp_path / "fleet", poll_wait_s=2) as fleet:
        fleet.start_server()
        package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
        pack_tar(package, tmp_path / "digits.tar")
        fleet.client.push_package(tmp_path / "digits.tar")
        edge1 = fleet.start_agent("edge1", "near-edge", {"site": "s1", "role": "edge"})
        dev1 = fleet.start_agent("dev1", "device", {"site": "s1"})
        fleet.client.deploy("digits", "1", {"role": "edge"})
        fleet.wait_for_versions({"edge1": {"digits": "1"}}, timeout=90)
        fleet.wait_for(
            lambda: fleet.nodes().get("edge1", {}).get("serve_url") == edge1.tier_url, 60, "edge1's tier URL"
        )
        gateway = fleet.start_gateway(
            "dev1",
            ["--data-dir", str(dev1.data_dir), "--timeout", "5", "--health-interval", "0.5",
             "--topology-interval", "600"],
        )  # fmt: skip

        # Before: the parent serves dev1's requests (dev1 itself has no digits model).
        fleet.wait_for(lambda: ask(gateway).headers.get("strata-served-by") == "parent", 30, "the parent to serve")

        revoked = subprocess.run(
            fleet.strata("nodes", "revoke", "edge1", "--server", fleet.server_url, "--token", fleet.admin_token),
            capture_output=True,
            text=True,
            env=fleet._env(),
            timeout=60,
            check=False,
        )
        assert revoked.returncode == 0, revoked.stderr
        edge1_hash = certificate_sha256(edge1)
        fleet.wait_for(lambda: edge1_hash in revoked_list(dev1), 30, "dev1 to save the revocation list")
        fleet.stop_server()
        started = time.monotonic()

        # After: within a couple of seconds, nothing more reaches edge1, though it still answers its tier port.
        def refused() -> httpx.Response | None:
            response = ask(gateway)
            return response if "parent:error" in response.headers.get("strata-route", "") else None

        response = fleet.wait_for(refused, 10, "the gateway to refuse the revoked parent")
        print(
            f"\nthe gateway refused the revoked parent {time.monotonic() - started:.2f}s after the control plane left"
        )
        assert response.headers.get("strata-served-by") != "parent"
        for _ in range(5):
            again = ask(gateway)
            assert again.headers.get("strata-served-by") != "parent", again.headers.get("strata-route")
        assert fleet.agent_live("edge1")  # edge1 itself still runs: only the gateway's check keeps it out
        log = gateway.process.log_path.read_text(errors="replace")
        assert "is revoked by the fleet" in log
        assert "Traceback" not in log
