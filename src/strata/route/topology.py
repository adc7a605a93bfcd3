"""A node's routing targets from the control plane: `GET /v1/nodes/{node_id}/topology`, read over httpx.

`fetch_topology` reads and checks the answer; `targets` turns it into the router's targets in tier order (the
node's own agent, its parents, the cloud), each fleet node over mutual TLS checked to be the node named. A
gateway refreshes it now and then and keeps the last one when the control plane cannot be reached: serving must
never depend on the cloud.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from strata.core.errors import AuthError, NotFound, TransportError
from strata.core.wire import error_text
from strata.route.peer import PeerTls
from strata.route.router import BadAnswer, Target, read_bounded

_MAX_TOPOLOGY_BYTES = 4 << 20  # a topology names a node's parents and cloud endpoints: far less than this


@dataclass(frozen=True)
class Topology:
    """Where a node's inference goes: its own serving URL, its parents' and the cloud endpoints', in order.

    `parents` and `cloud` are (name, url, node_id) with node_id None for a configured cloud endpoint (not a
    fleet node)."""

    node_id: str
    name: str
    tier: str
    serve_url: str | None
    parents: tuple[tuple[str, str, str | None], ...]
    cloud: tuple[tuple[str, str, str | None], ...]

    def targets(
        self,
        local_url: str | None = None,
        extra_parents: Sequence[str] = (),
        extra_cloud: Sequence[str] = (),
        peer_tls: PeerTls | None = None,
    ) -> list[Target]:
        """The router's targets (see `plan`)."""
        return self.plan(local_url, extra_parents, extra_cloud, peer_tls)[0]

    def plan(
        self,
        local_url: str | None = None,
        extra_parents: Sequence[str] = (),
        extra_cloud: Sequence[str] = (),
        peer_tls: PeerTls | None = None,
    ) -> tuple[list[Target], list[str]]:
        """The router's targets, and why each URL of the topology left out was left out.

        In tier order: local (`local_url`, else the node's own serving URL), then parents, then cloud; URLs given
        by hand come after the control plane's of the same tier, and each URL appears once.

        Fleet nodes named by the topology (parents, cloud-tier nodes) are reached only over mutual TLS: their
        URL must be https and `peer_tls` (the node's fleet contexts) given, and the context checks that the
        peer is the node the topology named; any other is left out. The node's own https URL is checked to be
        the node itself (a plain http one is its loopback serving port). URLs given by hand are taken as given
        (https ones over the fleet chain when `peer_tls` is given); configured cloud endpoints keep the
        system's CAs.
        """
        out: list[Target] = []
        refused: list[str] = []
        seen: set[str] = set()

        def add(tier: str, url: str, name: str, tls: ssl.SSLContext | None = None, node_id: str | None = None) -> None:
            if url and url not in seen:
                seen.add(url)
                out.append(Target(tier, url, name, tls=tls, node_id=node_id))

        def add_node(tier: str, url: str, name: str, node_id: str) -> None:
            if not url.startswith("https://"):
                refused.append(f"{tier} {name} ({node_id}) at {url}: a fleet node is reached only over https")
            elif peer_tls is None:
                refused.append(f"{tier} {name} ({node_id}) at {url}: mutual TLS needs the node's certificate")
            else:
                add(tier, url, name, peer_tls(node_id), node_id)

        if local_url:
            https = local_url.startswith("https://") and peer_tls is not None
            own = self.node_id or None
            add("local", local_url, self.name or local_url, peer_tls(own) if https and peer_tls else None, own)
        elif self.serve_url and self.serve_url.startswith("https://"):
            add_node("local", self.serve_url, self.name, self.node_id)
        elif self.serve_url:
            add("local", self.serve_url, self.name)
        for name, url, node_id in self.parents:
            if node_id is None:
                refused.append(f"parent {name} at {url}: the topology names no node for it")
            else:
                add_node("parent", url, name, node_id)
        for url in extra_parents:
            add("parent", url, url, peer_tls(None) if url.startswith("https://") and peer_tls else None)
        for name, url, node_id in self.cloud:
            if node_id is None:
                add("cloud", url, name)
            else:
                add_node("cloud", url, name, node_id)
        for url in extra_cloud:
            add("cloud", url, url)
        return out, refused


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
            parents=tuple(_endpoint(p) for p in raw["parents"]),
            cloud=tuple(_endpoint(c) for c in raw["cloud"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise TransportError(f"the control plane sent a malformed topology: {exc}") from exc


def _endpoint(raw: Any) -> tuple[str, str, str | None]:
    node_id = raw.get("node_id")
    return str(raw["name"]), str(raw["url"]), str(node_id) if node_id else None


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
        TransportError: the control plane cannot be reached (within `timeout` in all), or answers something else
            (an encoded or oversized answer too).
    """
    url = f"{server.rstrip('/')}/v1/nodes/{quote(node_id, safe='')}/topology"
    try:
        verify: ssl.SSLContext | bool = tls if tls is not None else True
        headers = {"authorization": f"Bearer {token}"} if token else {}
        headers["accept-encoding"] = "identity"
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(transport=transport, timeout=timeout, trust_env=False, verify=verify) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            body = await read_bounded(response, _MAX_TOPOLOGY_BYTES)
    except (httpx.HTTPError, TimeoutError) as exc:
        raise TransportError(f"cannot reach the control plane at {server}: {str(exc) or 'no answer in time'}") from exc
    except BadAnswer as exc:
        raise TransportError(f"the control plane sent a topology the gateway does not read: {exc}") from exc
    if response.status_code in (401, 403):
        raise AuthError(f"the control plane refused this caller for node {node_id}: {error_text(body)}")
    if response.status_code == 404:
        raise NotFound(f"the control plane has no node {node_id!r}")
    if response.status_code != 200:
        raise TransportError(f"the control plane answered {response.status_code} for the topology of {node_id}")
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's depth
        raise TransportError(f"the control plane sent a topology that is not JSON: {exc}") from exc
    return parse_topology(raw)
