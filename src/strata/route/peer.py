"""TLS contexts that accept a fleet node only when its certificate names the node the topology named.

The fleet's peer context checks a node's certificate chain to the fleet CA, not a host name (node certificates
name node ids: the URI SAN `urn:strata:node:<id>`). A gateway sending to a parent named by its topology wants
that very node, not any node of the fleet that answers on its URL, so each such target gets a context whose TLS
objects check the verified peer's node id as soon as the handshake completes, before one byte of the request
is sent. A mismatch fails the handshake with `PeerIdentityError` (an `ssl.SSLError`: httpx reports it as a
connection error, a failed attempt the circuit breaker counts).

A fleet certificate also passes the chain check after the fleet revoked it, until it expires; so the same check
refuses a peer whose certificate's sha256 (of its DER) is on the fleet's revocation list (`PeerRevokedError`).
The list is the one in the node's latest desired state, which its agent keeps on disk (`desired.json`):
`RevocationList` re-reads it when the file changes, so it holds while the control plane is away.

Only the standard library's ssl (`SSLContext.sslobject_class`, the hook asyncio and anyio use to make each
connection's TLS object) and hashlib.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import ssl
from collections.abc import Callable, Collection
from pathlib import Path

from strata.core.wire import DesiredState, ProtocolError
from strata.trust.fleet_tls import peer_node_id

log = logging.getLogger(__name__)

Revoked = Callable[[], Collection[str]]
"""The fleet's revoked certificates now (hex sha256 of each one's DER)."""


class PeerIdentityError(ssl.SSLCertVerificationError):
    """The peer's verified certificate names another node (or none) than the one expected."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "the peer is not the node expected"


class PeerRevokedError(PeerIdentityError):
    """The peer's verified certificate is on the fleet's revocation list."""


def check_peer_node(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, node_id: str | None, revoked: Revoked | None = None
) -> None:
    """Raises:
    PeerRevokedError: the peer's certificate is listed by `revoked`.
    PeerIdentityError: the peer's certificate does not name `node_id` (when one is given).
    """
    if revoked is not None:
        listed = revoked()
        der = ssl_object.getpeercert(binary_form=True)
        digest = hashlib.sha256(der).hexdigest() if der else ""
        if listed and digest in listed:
            raise PeerRevokedError(f"the peer's certificate (sha256 {digest[:16]}...) is revoked by the fleet")
    if node_id is None:
        return
    found = peer_node_id(ssl_object)
    if found != node_id:
        named = f"node {found}" if found else "no node"
        raise PeerIdentityError(f"the peer's certificate names {named}, not node {node_id} (the one expected there)")


def node_checked(context: ssl.SSLContext, node_id: str | None, revoked: Revoked | None = None) -> ssl.SSLContext:
    """Make `context` (a fresh one: it is changed) accept only peers whose certificate names `node_id` (None: any
    node) and is not listed by `revoked` (None: no revocation list).

    Raises:
        ValueError: `context` does not verify certificates (a node id from an unverified one means nothing).
    """
    if context.verify_mode != ssl.CERT_REQUIRED:
        raise ValueError("a node's identity can only be checked on a context that verifies certificates")

    class NodeCheckedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check_peer_node(self, node_id, revoked)

    class NodeCheckedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check_peer_node(self, node_id, revoked)

    context.sslobject_class = NodeCheckedObject
    context.sslsocket_class = NodeCheckedSocket
    return context


class RevocationList:
    """The fleet's revoked certificates as listed in a node's saved desired state (`desired.json`, written by its
    agent); the file is read again only when it changed (its size, mtime or inode), so a check costs one stat.

    A file that is missing lists nothing; one that does not parse keeps the list last read (and is logged).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[str] = frozenset()

    def __call__(self) -> frozenset[str]:
        """The revoked certificates' hex sha256 now."""
        try:
            info = os.stat(self.path)
        except OSError:
            stamp = None
        else:
            stamp = (info.st_mtime_ns, info.st_size, info.st_ino)
        if stamp == self._stamp:
            return self._revoked
        self._stamp = stamp
        if stamp is None:
            return self._revoked  # gone: what was known stays known
        try:
            raw = json.loads(self.path.read_bytes())
            self._revoked = DesiredState.from_json(raw["state"]).revoked_certificates
        except (OSError, ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("cannot read the revocation list in %s (%s); keeping the one read before", self.path, exc)
        return self._revoked


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
