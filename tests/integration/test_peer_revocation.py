"""Peers refuse revoked certificates, over real TLS on loopback: the agent's HTTP server with the peer gate
answers 403 (before reading the body, on connections opened before the revocation too), and the peer transport
will not talk to a server whose certificate is revoked. Certificates come from a real fleet CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ssl
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from strata.agent.httpd import HttpServer, Request, Response
from strata.agent.identity import FleetIdentity
from strata.agent.peers import REVOKED, PeerGate
from strata.agent.transport import H11Transport
from strata.core.errors import TransportError
from strata.core.wire import DesiredState
from strata.trust.ca import FleetCA
from strata.trust.fleet_tls import peer_node_id
from strata.trust.node import make_csr


def node_identity(ca: FleetCA, root: Path, name: str) -> FleetIdentity:
    """A node's trust folder: the fleet CA, its key, and a certificate the CA signed for it."""
    identity = FleetIdentity(root / name)
    identity.folder.mkdir(parents=True)
    identity.ca_path.write_bytes(ca.cert_pem)
    now = dt.datetime.now(dt.UTC)
    identity.cert_path.write_bytes(ca.sign_node_csr(make_csr(identity.key_path, name), name, now).pem)
    return identity


def der_sha256(identity: FleetIdentity) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(identity.cert_path.read_text())).hexdigest()


@dataclass
class Served:
    url: str
    desired: list[DesiredState | None]
    bodies: list[int]


@pytest.fixture
def nodes(tmp_path: Path) -> dict[str, FleetIdentity]:
    ca = FleetCA.create("fleet", dt.datetime.now(dt.UTC))
    return {name: node_identity(ca, tmp_path, name) for name in ("server", "client", "other")}


@pytest.fixture
def served(nodes: dict[str, FleetIdentity]) -> Iterator[Served]:
    """The server node's tier listener (the agent's HTTP server with a peer gate), on its own loop in a thread."""
    desired: list[DesiredState | None] = [None]
    bodies: list[int] = []

    async def handler(request: Request) -> Response:
        bodies.append(len(request.body))
        return Response.json(200, {"peer": request.peer})

    gate = PeerGate(lambda: desired[0])
    server = HttpServer(handler, peer_identity=peer_node_id, peer_refusal=gate.refusal)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start("127.0.0.1", 0, ssl=nodes["server"].server_context()))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield Served(f"https://127.0.0.1:{server.port}", desired, bodies)
    asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def revoke(served: Served, *hashes: str) -> None:
    served.desired[0] = DesiredState("server", (), revoked_certificates=frozenset(hashes))


def test_the_tier_listener_refuses_a_revoked_peer_even_on_an_open_connection(
    served: Served, nodes: dict[str, FleetIdentity]
) -> None:
    client = H11Transport(nodes["client"].peer_context())
    other = H11Transport(nodes["other"].peer_context())
    one_thread = ThreadPoolExecutor(1)  # the transport keeps one connection per thread: reuse it across the revocation

    def post(transport: H11Transport, body: bytes = b"{}") -> tuple[int, bytes]:
        answer = transport.request("POST", f"{served.url}/v2/x", headers={}, body=body, timeout=10)
        return answer.status, answer.body

    assert one_thread.submit(post, client).result() == (200, b'{"peer":"client"}')
    revoke(served, der_sha256(nodes["client"]))
    status, body = one_thread.submit(post, client, b"x" * (1 << 20)).result()
    assert status == 403
    assert REVOKED.encode() in body
    assert served.bodies == [2]  # the refused request's megabyte was never handed to the handler
    assert post(H11Transport(nodes["client"].peer_context()))[0] == 403  # a new connection, likewise
    assert post(other) == (200, b'{"peer":"other"}')  # other nodes are served as before
    revoke(served)  # the list moved on (the certificate expired): nothing is refused
    assert post(H11Transport(nodes["client"].peer_context()))[0] == 200


def test_the_peer_transport_will_not_talk_to_a_revoked_server(served: Served, nodes: dict[str, FleetIdentity]) -> None:
    revoked: list[DesiredState | None] = [None]
    transport = H11Transport(nodes["client"].peer_context(), peer_refusal=PeerGate(lambda: revoked[0]).refusal)
    assert transport.request("GET", f"{served.url}/", headers={}, timeout=10).status == 200
    revoked[0] = DesiredState("client", (), revoked_certificates=frozenset({der_sha256(nodes["server"])}))
    transport.use_ssl_context(nodes["client"].peer_context())  # drop the pooled connection: a new handshake
    with pytest.raises(TransportError, match="revoked"):
        transport.request("GET", f"{served.url}/", headers={}, timeout=10)


def test_a_kept_alive_connection_to_a_server_revoked_since_is_refused(
    served: Served, nodes: dict[str, FleetIdentity]
) -> None:
    """Downloads keep their connection to a parent alive from piece to piece: the revocation check runs before each
    exchange, not only at the handshake."""
    revoked: list[DesiredState | None] = [None]
    transport = H11Transport(nodes["client"].peer_context(), peer_refusal=PeerGate(lambda: revoked[0]).refusal)
    assert transport.request("GET", f"{served.url}/", headers={}, timeout=10).status == 200
    with transport.stream("GET", f"{served.url}/", headers={}, timeout=10) as response:
        assert response.status == 200
        while response.read(1 << 16):
            pass
    revoked[0] = DesiredState("client", (), revoked_certificates=frozenset({der_sha256(nodes["server"])}))
    with pytest.raises(TransportError, match="revoked"):
        transport.request("GET", f"{served.url}/", headers={}, timeout=10)
    with (
        pytest.raises(TransportError, match="revoked"),
        transport.stream("GET", f"{served.url}/", headers={}, timeout=10),
    ):
        pass
