"""Who a node falls back to: its parent near-edge nodes and the cloud inference endpoints (a pure decision).

A device's parents are the near-edge nodes of its site (the `site` label), those the control plane sees
online first; a near-edge node has no parent (its fallback is the cloud); a cloud node falls back to nothing.
Cloud endpoints are those the operator configured (`strata server --cloud-endpoint URL`), then the serving
URLs of cloud-tier nodes. Offline parents are still listed, after the online ones: a site whose WAN link is
down looks offline from here but is reachable on its own network, and the gateway probes health itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from strata.control.inventory import NodeView

SITE_LABEL: Final = "site"


@dataclass(frozen=True)
class Endpoint:
    """Somewhere a node may send inference: a node's serving URL, or a configured cloud endpoint."""

    url: str
    name: str
    tier: str
    node_id: str | None = None
    online: bool | None = None  # None: not a node (a configured endpoint)

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url, "name": self.name, "tier": self.tier, "node_id": self.node_id, "online": self.online}


@dataclass(frozen=True)
class Topology:
    """A node's place in the tiers: itself, its parents in order of preference, and the cloud endpoints."""

    node_id: str
    name: str
    tier: str
    site: str | None
    serve_url: str | None
    parents: tuple[Endpoint, ...]
    cloud: tuple[Endpoint, ...]


def _ordered(nodes: Iterable[NodeView]) -> list[NodeView]:
    return sorted(nodes, key=lambda n: (not n.online, n.name))


def node_topology(node: NodeView, fleet: Sequence[NodeView], cloud_endpoints: Sequence[str]) -> Topology:
    """The topology of `node` in `fleet` (every node that is not revoked), with the configured cloud endpoints."""
    site = node.labels.get(SITE_LABEL)
    others = [n for n in fleet if n.id != node.id and n.serve_url]
    parents: list[Endpoint] = []
    if node.tier == "device" and site:
        parents = [
            Endpoint(n.serve_url or "", n.name, n.tier, n.id, n.online)
            for n in _ordered(o for o in others if o.tier == "near-edge" and o.labels.get(SITE_LABEL) == site)
        ]
    cloud: list[Endpoint] = []
    if node.tier != "cloud":
        cloud = [Endpoint(url, url, "cloud") for url in cloud_endpoints]
        cloud += [
            Endpoint(n.serve_url or "", n.name, n.tier, n.id, n.online)
            for n in _ordered(o for o in others if o.tier == "cloud")
            if n.serve_url not in cloud_endpoints
        ]
    return Topology(node.id, node.name, node.tier, site, node.serve_url, tuple(parents), tuple(cloud))
