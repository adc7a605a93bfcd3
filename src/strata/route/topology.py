"""A node's routing targets from the control plane: `GET /v1/nodes/{node_id}/topology`, read over httpx.

`fetch_topology` reads and checks the answer; `targets` turns it into the router's targets in tier order (the
node's own agent, its parents, the cloud). A gateway refreshes it now and then and keeps the last one when the
control plane cannot be reached: serving must never depend on the cloud.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from strata.core.errors import AuthError, NotFound, TransportError
from strata.route.router import Target


@dataclass(frozen=True)
class Topology:
    """Where a node's inference goes: its own serving URL, its parents' and the cloud endpoints', in order."""

    node_id: str
    name: str
    tier: str
    serve_url: str | None
    parents: tuple[tuple[str, str], ...]  # (name, url)
    cloud: tuple[tuple[str, str], ...]
    nodes: frozenset[str] = frozenset()  # the URLs that are fleet nodes (their tier listeners), not endpoints

    def targets(
        self,
        local_url: str | None = None,
        extra_parents: Sequence[str] = (),
        extra_cloud: Sequence[str] = (),
        fleet_tls: ssl.SSLContext | None = None,
    ) -> list[Target]:
        """The router's targets: local (`local_url`, else the node's own serving URL), then parents, then cloud;
        URLs given by hand come after the control plane's of the same tier, and each URL appears once.

        `fleet_tls` (the node's peer context) is used for https URLs of fleet nodes: every parent, and cloud
        nodes the topology names; configured cloud endpoints keep the system's CAs."""
        out: list[Target] = []
        seen: set[str] = set()

        def add(tier: str, url: str, name: str) -> None:
            if url and url not in seen:
                seen.add(url)
                fleet = url.startswith("https://") and (tier == "parent" or url in self.nodes)
                out.append(Target(tier, url, name, tls=fleet_tls if fleet else None))

        local = local_url or self.serve_url
        if local:
            add("local", local, self.name)
        for name, url in self.parents:
            add("parent", url, name)
        for url in extra_parents:
            add("parent", url, url)
        for name, url in self.cloud:
            add("cloud", url, name)
        for url in extra_cloud:
            add("cloud", url, url)
        return out


def parse_topology(raw: Any) -> Topology:
    """Check a topology document.

    Raises:
        TransportError: it is not the shape the control plane sends.
    """
    try:
        if not isinstance(raw, Mapping):
            raise TypeError("not an object")
        return Topology(
            node_id=str(raw["node_id"]),
            name=str(raw["name"]),
            tier=str(raw["tier"]),
            serve_url=str(raw["serve_url"]) if raw.get("serve_url") else None,
            parents=tuple((str(p["name"]), str(p["url"])) for p in raw["parents"]),
            cloud=tuple((str(c["name"]), str(c["url"])) for c in raw["cloud"]),
            nodes=frozenset(str(e["url"]) for e in [*raw["parents"], *raw["cloud"]] if e.get("node_id")),
        )
    except (KeyError, TypeError) as exc:
        raise TransportError(f"the control plane sent a malformed topology: {exc}") from exc


async def fetch_topology(
    server: str,
    node_id: str,
    token: str | None,
    *,
    tls: ssl.SSLContext | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    timeout: float = 10.0,
) -> Topology:
    """A node's topology from the control plane at `server`: as the node itself (`tls` presents its fleet
    certificate), or as an operator (`token`, with `tls` trusting the fleet CA).

    Raises:
        AuthError: the token is refused (401/403).
        NotFound: no such node.
        TransportError: the control plane cannot be reached, or answers something else.
    """
    url = f"{server.rstrip('/')}/v1/nodes/{quote(node_id, safe='')}/topology"
    try:
        verify: ssl.SSLContext | bool = tls if tls is not None else True
        headers = {"authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False, verify=verify) as client:
            response = await client.get(url, headers=headers)
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot reach the control plane at {server}: {exc}") from exc
    if response.status_code in (401, 403):
        raise AuthError(f"the control plane refused this caller for node {node_id}: {response.text[:200]}")
    if response.status_code == 404:
        raise NotFound(f"the control plane has no node {node_id!r}")
    if response.status_code != 200:
        raise TransportError(f"the control plane answered {response.status_code} for the topology of {node_id}")
    try:
        raw = response.json()
    except ValueError as exc:
        raise TransportError(f"the control plane sent a topology that is not JSON: {exc}") from exc
    return parse_topology(raw)
