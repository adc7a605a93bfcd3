"""TLS contexts that accept a fleet node only when its certificate names the node the topology named.

The fleet's peer context checks a node's certificate chain to the fleet CA, not a host name (node certificates
name node ids: the URI SAN `urn:strata:node:<id>`). A gateway sending to a parent named by its topology wants
that very node, not any node of the fleet that answers on its URL, so each such target gets a context whose TLS
objects check the verified peer's node id as soon as the handshake completes, before one byte of the request
is sent. A mismatch fails the handshake with `PeerIdentityError` (an `ssl.SSLError`: httpx reports it as a
connection error, a failed attempt the circuit breaker counts).

Only the standard library's ssl (`SSLContext.sslobject_class`, the hook asyncio and anyio use to make each
connection's TLS object).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from strata.trust.fleet_tls import peer_node_id


class PeerIdentityError(ssl.SSLCertVerificationError):
    """The peer's verified certificate names another node (or none) than the one expected."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the peer is not the node expected"


def check_peer_node(ssl_object: ssl.SSLObject | ssl.SSLSocket, node_id: str) -> None:
    """Raises:
    PeerIdentityError: the peer's certificate does not name `node_id`.
    """
    found = peer_node_id(ssl_object)
    if found != node_id:
        named = f"node {found}" if found else "no node"
        raise PeerIdentityError(f"the peer's certificate names {named}, not node {node_id} (the one expected there)")


def node_checked(context: ssl.SSLContext, node_id: str) -> ssl.SSLContext:
    """Make `context` (a fresh one: it is changed) accept only peers whose certificate names `node_id`.

    Raises:
        ValueError: `context` does not verify certificates (a node id from an unverified one means nothing).
    """
    if context.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("a node's identity can only be checked on a context that verifies certificates")

    class NodeCheckedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check_peer_node(self, node_id)

    class NodeCheckedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check_peer_node(self, node_id)

    context.sslobject_class = NodeCheckedObject
    context.sslsocket_class = NodeCheckedSocket
    return context


PeerTls = Callable[[str | None], ssl.SSLContext]
"""The TLS context for a fleet node: `(node_id)` checks the peer is that node; `(None)` only its chain."""


def find_peer_identity_error(exc: BaseException) -> PeerIdentityError | None:
    """The `PeerIdentityError` behind an error (httpx wraps the ssl error twice), if there is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, PeerIdentityError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
