"""Refusing revoked peers: other nodes' certificates are checked against the fleet's revocation list.

A peer's certificate passes the TLS handshake when it chains to the fleet CA and has not expired; that alone
would let a revoked node's certificate work on every other node until it expires. So the control plane lists
the hashes of the revoked certificates still valid in every desired state, and the node refuses a peer whose
certificate's sha256 (of its DER) is listed: on its tier listener (403, each request, so a connection opened
before the revocation is cut too) and when it calls another node (the parent relay). The list is the one of
the latest desired state, kept on disk with it (`desired.json`), so a node restarted while its control plane is
away still refuses what it knew. The standard library's `hashlib` only: the agent never loads `cryptography`.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Collection
from typing import Final

from strata.core.wire import DesiredState

log = logging.getLogger("strata.agent.peers")

REVOKED: Final = "the fleet revoked this certificate"


def refusal(der: bytes | None, revoked: Collection[str]) -> str | None:
    """Why a peer presenting the certificate `der` (DER bytes) is refused, or None when it is not revoked."""
    if der is None or not revoked:
        return None
    return REVOKED if hashlib.sha256(der).hexdigest() in revoked else None


class PeerGate:
    """The check the tier listener and the peer transport share, over the node's latest desired state.

    `desired` returns that state (None before the first one); it is read on every check, so a new revocation list
    takes effect for the next request without any restart.
    """

    def __init__(self, desired: Callable[[], DesiredState | None]) -> None:
        self._desired = desired
        self._lock = threading.Lock()
        self._logged: frozenset[str] = frozenset()

    def refusal(self, der: bytes | None) -> str | None:
        """Why the peer presenting `der` is refused, or None (see `refusal`); logs each refused certificate once."""
        state = self._desired()
        revoked = state.revoked_certificates if state is not None else frozenset()
        reason = refusal(der, revoked)
        if reason is not None and der is not None:
            digest = hashlib.sha256(der).hexdigest()
            with self._lock:
                first = digest not in self._logged
                self._logged = (self._logged & revoked) | {digest}  # bounded by the list itself
            if first:
                log.warning("refusing a peer: its certificate (sha256 %s) is revoked", digest[:16])
        return reason
