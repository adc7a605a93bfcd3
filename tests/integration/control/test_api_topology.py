"""`GET /v1/nodes/{id}/topology`: a device's parents are the near-edge nodes of its site, then the cloud."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from control_harness import Harness, NodeCredentials, StartServer

from strata.control.settings import ServerSettings
from strata.route.topology import parse_topology


def report(server: Harness, node: NodeCredentials, tier: str, labels: dict[str, str], url: str | None) -> None:
    status = {"tier": tier, "labels": labels, "profile": "cpu-generic", "serve_url": url}
    response = server.client.put(f"/v1/nodes/{node.node_id}/status", json=status, headers=node.headers)
    assert response.status_code == 204, response.text


def topology(server: Harness, node: NodeCredentials, headers: dict[str, str] | None = None) -> Any:
    return server.client.get(f"/v1/nodes/{node.node_id}/topology", headers=headers or node.headers)


def fleet(server: Harness) -> dict[str, NodeCredentials]:
    """Two sites, each with a near-edge node (site a has two), devices, and a cloud-tier node."""
    nodes: dict[str, tuple[str, dict[str, str], str | None]] = {
        "dev-a": ("device", {"site": "a"}, "http://10.0.1.10:8080"),
        "edge-a2": ("near-edge", {"site": "a"}, "http://10.0.1.3:8080"),
        "edge-a1": ("near-edge", {"site": "a"}, "http://10.0.1.2:8080"),
        "edge-b": ("near-edge", {"site": "b"}, "http://10.0.2.2:8080"),
        "dev-nosite": ("device", {}, "http://10.0.3.10:8080"),
        "edge-a-silent": ("near-edge", {"site": "a"}, None),  # never said where it serves
        "cloud-1": ("cloud", {}, "http://cloud.internal:8080"),
    }
    enrolled = {}
    for name, (tier, labels, url) in nodes.items():
        enrolled[name] = server.enroll(name, labels, tier=tier)
        report(server, enrolled[name], tier, labels, url)
    return enrolled


def test_a_device_falls_back_to_the_near_edge_nodes_of_its_site_then_the_cloud(server: Harness) -> None:
    nodes = fleet(server)
    server.clock.advance(200)  # everyone looks offline now ...
    report(server, nodes["edge-a2"], "near-edge", {"site": "a"}, "http://10.0.1.3:8080")  # ... but edge-a2

    response = topology(server, nodes["dev-a"])

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["name"], body["tier"], body["site"], body["serve_url"]) == (
        "dev-a",
        "device",
        "a",
        "http://10.0.1.10:8080",
    )
    # online first, then by name; a parent that reported no URL cannot be used
    assert [(p["name"], p["online"]) for p in body["parents"]] == [("edge-a2", True), ("edge-a1", False)]
    assert [c["url"] for c in body["cloud"]] == ["http://cloud.internal:8080"]
    # a gateway reaches fleet nodes only over https (mutual TLS, checked to be the node named): these plain-http
    # parents and cloud node are left out, with the reason
    targets, refused = parse_topology(body).plan()
    assert [(t.tier, t.url) for t in targets] == [("local", "http://10.0.1.10:8080")]
    assert [r.split(" at ")[1].split(":")[0] for r in refused] == ["http"] * 3
    assert all("only over https" in r for r in refused)


def test_near_edge_nodes_and_site_less_devices_have_no_parent_and_the_cloud_has_no_fallback(server: Harness) -> None:
    nodes = fleet(server)
    edge = topology(server, nodes["edge-b"]).json()
    assert (edge["parents"], [c["name"] for c in edge["cloud"]]) == ([], ["cloud-1"])
    assert topology(server, nodes["dev-nosite"]).json()["parents"] == []
    cloud = topology(server, nodes["cloud-1"]).json()
    assert (cloud["parents"], cloud["cloud"]) == ([], [])


def test_configured_cloud_endpoints_come_before_cloud_nodes(
    settings: ServerSettings, start_server: StartServer
) -> None:
    configured = replace(settings, cloud_endpoints=("https://triton.example.com",))
    with start_server(configured) as server:
        nodes = fleet(server)
        cloud = topology(server, nodes["dev-a"]).json()["cloud"]
    assert [(c["url"], c["node_id"] is None) for c in cloud] == [
        ("https://triton.example.com", True),
        ("http://cloud.internal:8080", False),
    ]


def test_a_node_reads_only_its_own_topology_and_the_operator_reads_any(server: Harness) -> None:
    nodes = fleet(server)
    other = server.client.get(f"/v1/nodes/{nodes['edge-b'].node_id}/topology", headers=nodes["dev-a"].headers)
    assert other.status_code == 403
    assert topology(server, nodes["edge-b"], headers=server.admin).status_code == 200
    assert server.client.get(f"/v1/nodes/{nodes['dev-a'].node_id}/topology").status_code == 401
    assert server.client.get("/v1/nodes/nope/topology", headers=server.admin).status_code == 404
