"""Node attestation on the control plane: issue one-time nonces, check signed reports, record the verdict.

A node asks for a nonce, signs a report of what it runs with its node key, and sends it over mutual TLS; the
signature must verify under the certificate it connected with, the nonce must be the one just issued to it
(one use, five minutes), and its agent code must be on the release allowlist. The verdict is stored on the node:
placement policies that require attestation read it, so a node that fails stops receiving such models.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterable
from typing import Any

from strata.control.db import Database, Node
from strata.control.feed import ChangeFeed
from strata.core.attest import NONCE_TTL_S, Report, Verdict, judge
from strata.core.errors import AuthError, NotFound
from strata.trust.attestation import verify_signature


class AttestationService:
    """Nonces in memory (a restart only makes nodes ask again), verdicts in the database."""

    def __init__(self, db: Database, feed: ChangeFeed, clock: Callable[[], float], allowlist: Iterable[str]) -> None:
        self._db = db
        self._feed = feed
        self._clock = clock
        self.allowlist = frozenset(allowlist)
        self._nonces: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def challenge(self, node_id: str) -> dict[str, Any]:
        """A fresh nonce for `node_id` (replacing any earlier one)."""
        nonce = secrets.token_urlsafe(24)
        expires = self._clock() + NONCE_TTL_S
        with self._lock:
            self._nonces[node_id] = (nonce, expires)
        return {"nonce": nonce, "expires_at": expires}

    def submit(self, node_id: str, raw_report: dict[str, Any], signature: str, certificate_der: bytes) -> Verdict:
        """Check a signed report and record the verdict (the nonce is spent either way).

        Raises:
            AuthError: the report is malformed or its signature does not verify under the node's certificate.
            NotFound: no such node.
            StoreError: the database failed.
        """
        report = Report.from_json(raw_report)
        verify_signature(report, signature, certificate_der)
        with self._lock:
            nonce, expires = self._nonces.pop(node_id, ("", 0.0))
        issued = nonce if expires > self._clock() else None
        verdict = judge(report, node_id, issued, self.allowlist)
        with self._db.transaction() as session:
            node = session.get(Node, node_id)
            if node is None or node.revoked_at is not None:
                raise NotFound(f"no node {node_id!r}")
            changed = node.attestation != verdict.level
            node.attestation = verdict.level
            node.attested_at = self._clock()
            node.attestation_detail = verdict.reason
        if changed:
            self._feed.bump()  # placement policies that require attestation now decide differently
        return verdict

    @staticmethod
    def require_certificate(certificate_der: bytes | None) -> bytes:
        """Raises:
        AuthError: the report did not come over mutual TLS (nothing to check its signature against).
        """
        if certificate_der is None:
            raise AuthError("attestation reports are sent over mutual TLS with the node's certificate")
        return certificate_der
