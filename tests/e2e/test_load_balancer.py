"""Two `strata server` replicas on one data folder behind HAProxy (deploy/haproxy/haproxy.cfg), with a real agent.

TLS passes through the balancer: the replica, not HAProxy, verifies a node's client certificate (mutual TLS end to
end), connections are spread over both replicas, and a replica killed with SIGKILL is taken out by HAProxy's health
check while the node carries on through the survivor. Where haproxy is missing the test fails with that reason.

The replicas coordinate through the fleet-wide change feed (strata.control.feed.SharedGeneration): a deploy made
through the replica that does not hold the agent's poll reaches the node too
(test_a_deploy_through_the_other_replica_reaches_the_node). The replica that holds the poll is found in the
replicas' access logs.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2e_helpers import push_model
from lb_helpers import BalancedFleet, balanced_fleet

pytestmark = pytest.mark.slow


@pytest.fixture
def lb(tmp_path: Path) -> Iterator[BalancedFleet]:
    with balanced_fleet(tmp_path / "fleet") as running:
        yield running


def served(lb: BalancedFleet, name: str, path: str) -> list[int]:
    """The statuses of requests for `path` in replica `name`'s access log."""
    pattern = re.compile(rf'"GET {re.escape(path)}[^"]* HTTP/1.1" (\d{{3}})')
    return [int(status) for status in pattern.findall(lb.replica_log(name))]


def node_id(lb: BalancedFleet, name: str) -> str:
    return lb.fleet.node_id(name)


def poller(lb: BalancedFleet, node: str) -> str:
    """The replica that answers the node's long polls now (its agent keeps one connection alive)."""
    path = f"/v1/nodes/{node}/desired"

    def found() -> str | None:
        return next((name for name in ("a", "b") if served(lb, name, path)), None)

    return lb.fleet.wait_for(found, 20, f"a replica to answer {path}")


def cli_at(lb: BalancedFleet, replica: str, *args: str) -> subprocess.CompletedProcess[str]:
    """An operator command sent to one replica directly, past the balancer."""
    fleet = lb.fleet
    env = {**fleet._env(), "STRATA_TOKEN": fleet.admin_token, "STRATA_CA": str(fleet.ca_path)}
    env["STRATA_SERVER"] = f"https://127.0.0.1:{lb.replica_ports[replica]}"
    return subprocess.run(fleet.strata(*args), env=env, capture_output=True, text=True, timeout=60, check=False)


def test_mutual_tls_through_haproxy_spread_over_replicas_and_failover_after_sigkill(
    lb: BalancedFleet, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    fleet = lb.fleet
    url = fleet.server_url
    assert url == f"https://127.0.0.1:{lb.lb_port}"

    # The probe needs no credential and says nothing else.
    probe = httpx.get(f"{url}/healthz", verify=fleet.tls(), timeout=5)
    assert (probe.status_code, probe.text) == (200, "ok")

    # A real agent enrolls through the balancer (the certificate it checks names the balancer) and gets a deploy.
    fleet.start_agent("n1", "device", {"fleet": "lb"})
    fleet.wait_for(lambda: "n1" in fleet.nodes(), 30, "n1 to enroll through HAProxy", fleet.agents["n1"].process)
    node = node_id(lb, "n1")
    push_model(fleet, digits_onnx, "1", tmp_path)  # through the balancer: both replicas share the blob store
    deployed = cli_at(lb, poller(lb, node), "deploy", "digits", "1", "--selector", "fleet=lb")
    assert deployed.returncode == 0, deployed.stderr
    fleet.wait_for_versions({"n1": {"digits": "1"}})

    # Mutual TLS end to end: the node's certificate reaches a replica, which authorizes the node by it ...
    desired = f"{url}/v1/nodes/{node}/desired"
    with httpx.Client(verify=fleet.tls("n1"), timeout=10) as client:
        assert client.get(desired).status_code == 200
    # ... and without one the refusal is the replica's (a strata error body; HAProxy in TCP mode cannot answer HTTP).
    refused = httpx.get(desired, verify=fleet.tls(), timeout=10)
    assert refused.status_code == 401, refused.text
    assert refused.json()["code"], refused.text
    assert 401 in served(lb, "a", f"/v1/nodes/{node}/desired") + served(lb, "b", f"/v1/nodes/{node}/desired")

    # Connections are spread over both replicas: eight held open at once (HAProxy balances by least connections,
    # so connections opened and closed one after another would all go to the replica without the node's poll),
    # one request each on /v1/health (HAProxy's own checks fill the logs with /healthz).
    admin = {"authorization": f"Bearer {fleet.admin_token}"}
    before = {name: len(served(lb, name, "/v1/health")) for name in ("a", "b")}
    clients = [httpx.Client(headers=admin, verify=fleet.tls(), timeout=5) for _ in range(8)]
    try:
        for client in clients:
            assert client.get(f"{url}/v1/health").status_code == 200
    finally:
        for client in clients:
            client.close()

    # access-log lines are written after the response: wait for all eight (a fixed pause was a guess at a loaded
    # machine's speed); the bound only ends a hang
    def logged() -> dict[str, int] | None:
        counts = {name: len(served(lb, name, "/v1/health")) - before[name] for name in ("a", "b")}
        return counts if sum(counts.values()) >= 8 else None

    spread = fleet.wait_for(logged, 30, "the replicas to log the eight /v1/health requests")
    assert sum(spread.values()) == 8
    assert min(spread.values()) >= 2, spread

    # SIGKILL the replica holding the agent's poll: HAProxy's check takes it out, the node's next polls go to the
    # survivor.
    killed = poller(lb, node)
    survivor = "b" if killed == "a" else "a"
    lb.replicas[killed].kill()
    down, up = ("replica1", "replica2") if killed == "a" else ("replica2", "replica1")
    fleet.wait_for(lambda: lb.server_states().get(down) == "DOWN", 10, f"HAProxy to mark replica {killed} DOWN")
    assert lb.server_states()[up] == "UP"
    survivor_before = len(served(lb, survivor, f"/v1/nodes/{node}/desired"))
    with httpx.Client(verify=fleet.tls("n1"), timeout=10) as client:
        for _ in range(5):
            assert client.get(desired, headers={"connection": "close"}).status_code == 200
    fleet.wait_for(
        lambda: len(served(lb, survivor, f"/v1/nodes/{node}/desired")) - survivor_before >= 5,
        30,
        f"replica {survivor} to log the five requests",
    )

    # The running agent, whose connection to the killed replica died, carries on through the survivor (the only
    # replica left, so the deploy through the balancer is made there too).
    push_model(fleet, digits_onnx_v2, "2", tmp_path)
    assert fleet.cli("deploy", "digits", "2", "--selector", "fleet=lb").returncode == 0
    fleet.wait_for_versions({"n1": {"digits": "2"}}, timeout=60)
    assert fleet.agents["n1"].process.running


def test_a_deploy_through_the_other_replica_reaches_the_node(
    lb: BalancedFleet, digits_onnx: Path, tmp_path: Path
) -> None:
    fleet = lb.fleet
    fleet.start_agent("n1", "device", {"fleet": "lb"})
    fleet.wait_for(lambda: "n1" in fleet.nodes(), 30, "n1 to enroll through HAProxy", fleet.agents["n1"].process)
    node = node_id(lb, "n1")
    push_model(fleet, digits_onnx, "1", tmp_path)
    other = "b" if poller(lb, node) == "a" else "a"
    assert cli_at(lb, other, "deploy", "digits", "1", "--selector", "fleet=lb").returncode == 0
    # one 5 s poll to wake, then the download and activation, which a loaded machine stretches; a replica that
    # never hears of the other's deploy keeps answering from its own view, so the bound only ends a hang
    fleet.wait_for_versions({"n1": {"digits": "1"}}, timeout=30)
