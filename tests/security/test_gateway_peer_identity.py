"""A node's gateway reaches the nodes its topology names over mutual TLS, and only those very nodes.

Real control plane, real agents, a real `strata gateway --data-dir` acting as device `dev1` (site s1):

- the near-edge node `edge1` (site s1, dev1's parent) registers its tier URL, then goes away; a device of another
  site, `rogue`, comes up listening on that very URL and serves a model there (an enrolled node of the fleet:
  its certificate chains to the fleet CA). The topology still names edge1 at that URL. The gateway must not
  send dev1's inference there: the peer's certificate names rogue, not edge1.
- dev1 has a tier port, so its own URL in the topology is https: the gateway must reach it with the fleet
  certificate, checked to be dev1 itself (before, every answer came from the parent).
- dev1 stops promptly on SIGTERM while the gateway still holds the keep-alive TLS connection of a request it
  forwarded there (dev1 used to wait 10 s for the gateway's side of the TLS close).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from strata.core.oip import encode_request
from strata.core.package import pack_tar
from strata.examples.digits import load_data
from strata.localfleet import GatewayHandle, LocalFleet
from strata.package_build import build_package

pytestmark = pytest.mark.slow


@dataclass
class Setup:
    fleet: LocalFleet
    gateway: GatewayHandle


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, digits_onnx: Path) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("peers")
    with LocalFleet(work / "fleet", poll_wait_s=2) as fleet:
        fleet.start_server()
        package = build_package(digits_onnx, work / "pkg", name="digits", version="1")
        pack_tar(package, work / "digits.tar")
        fleet.client.push_package(work / "digits.tar")
        dev1 = fleet.start_agent("dev1", "device", {"site": "s1"}, tier_port=True)
        edge1 = fleet.start_agent("edge1", "near-edge", {"site": "s1"})
        fleet.wait_for(
            lambda: all(fleet.nodes().get(a.name, {}).get("serve_url") == a.tier_url for a in (dev1, edge1)),
            60,
            "dev1 and edge1 to report their tier URLs",
        )
        edge1.process.kill()
        assert edge1.tier_port is not None
        fleet.start_agent("rogue", "device", {"site": "s2"}, tier_port=False,
                          extra_args=["--tier-port", str(edge1.tier_port)])  # fmt: skip
        fleet.client.deploy("digits", "1", {"site": "s2"})
        fleet.wait_for_versions({"rogue": {"digits": "1"}}, timeout=90)
        gateway = fleet.start_gateway(
            "dev1",
            ["--data-dir", str(dev1.data_dir), "--timeout", "5", "--health-interval", "0.5",
             "--topology-interval", "1"],
        )  # fmt: skip
        yield Setup(fleet, gateway)


def digits_request() -> tuple[bytes, dict[str, str]]:
    body, length = encode_request({"X": load_data().test_x[:1].astype(np.float32)})
    return body, {"inference-header-content-length": str(length)}


def digits_served(url: str) -> float:
    """How many digits inferences the agent at `url` has served (Triton's success counter)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = "nv_inference_request_success{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and 'model="digits"' in line)  # fmt: skip


def routed_over(gateway: GatewayHandle, tiers: set[str], timeout: float = 30) -> httpx.Response:
    """Ask for the digits model until the route tried every tier of `tiers` (the topology read, probes done)."""
    body, headers = digits_request()
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.post(f"{gateway.url}/v2/models/digits/infer", content=body, headers=headers, timeout=30)
        route = response.headers.get("strata-route", "")
        if tiers <= {attempt.split(":")[0] for attempt in route.split(", ")} or time.monotonic() > deadline:
            return response
        time.sleep(0.3)


def test_the_nodes_own_tier_url_is_reached_with_its_fleet_certificate(setup: Setup) -> None:
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(f"{setup.gateway.url}/v2", timeout=30)
        if response.headers.get("strata-served-by") == "local" or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert (response.status_code, response.headers.get("strata-served-by")) == (200, "local"), (
        response.headers.get("strata-route"),
        response.text,
    )


def test_a_node_answering_on_the_url_of_the_parent_the_topology_named_gets_nothing(setup: Setup) -> None:
    response = routed_over(setup.gateway, {"local", "parent"})
    route = response.headers.get("strata-route", "")
    assert response.headers.get("strata-served-by") != "parent", (response.status_code, route, response.text)
    assert "parent:error" in route
    # the rogue node served nothing: its own counters say so (and they do count what it serves)
    rogue = setup.fleet.agents["rogue"]
    assert digits_served(rogue.serve_url) == 0
    body, headers = digits_request()
    assert httpx.post(f"{rogue.serve_url}/v2/models/digits/infer", content=body, headers=headers).status_code == 200
    assert digits_served(rogue.serve_url) == 1
    # and the gateway said why
    log = setup.gateway.process.log_path.read_text(errors="replace")
    nodes = setup.fleet.nodes()
    assert f"names node {nodes['rogue']['id']}, not node {nodes['edge1']['id']}" in log


def test_the_node_stops_at_once_while_its_gateway_holds_an_idle_tls_connection(setup: Setup) -> None:
    # last in this module: dev1 does not come back
    response = httpx.get(f"{setup.gateway.url}/v2", timeout=30)
    assert response.headers.get("strata-served-by") == "local", response.headers.get("strata-route")
    dev1 = setup.fleet.agents["dev1"].process
    assert dev1.popen is not None
    started = time.monotonic()
    dev1.signal(signal.SIGTERM)
    dev1.popen.wait(30)
    took = time.monotonic() - started
    print(f"\ndev1 stopped {took:.2f}s after SIGTERM, its gateway still connected")
    assert took < 3.0, dev1.log_tail()  # it took 10 s: the grace, then the cancellation's
    assert dev1.popen.returncode == 0
    assert "agent stopped" in dev1.log_tail(5)
