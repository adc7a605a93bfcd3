"""Node attestation on the control plane: issue one-time nonces, check signed reports, record the verdict.

A node asks for a nonce, signs a report of what it runs with its node key, and sends it over mutual TLS; the
signature must verify under the certificate it connected with, the nonce must be the one just issued to it
(one use, five minutes), and its agent code must be on the release allowlist. The verdict is stored on the node:
placement policies that require attestation read it, so a node that fails stops receiving such models.

A node with a TPM first registers its attestation key (AK): its EK certificate must come from a TPM manufacturer
CA the server trusts (`--tpm-ca`), and it must recover a secret encrypted to that EK for that AK (credential
activation, see `strata.trust.tpm_verify`). From then on every report must carry a quote by that AK over the
report's hash; a good quote (and PCR values matching `--tpm-pcr`, if any) earns level `tpm`.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from strata.control.db import Database, Node
from strata.control.feed import ChangeFeed
from strata.core.attest import NONCE_TTL_S, Report, Verdict, judge, judge_tpm, parse_pcr_requirements
from strata.core.errors import AuthError, Conflict, NotFound
from strata.trust.attestation import verify_signature


class AttestationService:
    """Nonces in memory (a restart only makes nodes ask again), verdicts in the database."""

    def __init__(
        self,
        db: Database,
        feed: ChangeFeed,
        clock: Callable[[], float],
        allowlist: Iterable[str],
        *,
        tpm_cas: Iterable[Path] = (),
        tpm_pcrs: Iterable[str] = (),
    ) -> None:
        """Raises:
        ConfigError: a TPM CA file does not load, or a required PCR is not BANK:INDEX=HEX.
        """
        self._db = db
        self._feed = feed
        self._clock = clock
        self.allowlist = frozenset(allowlist)
        self._nonces: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.tpm_pcrs = parse_pcr_requirements(tpm_pcrs)
        self._tpm_cas: tuple[Any, ...] = ()
        if tpm_cas:
            from strata.trust.tpm_verify import load_manufacturer_cas

            self._tpm_cas = load_manufacturer_cas(tuple(tpm_cas))
        self._tpm_challenges: dict[str, tuple[Any, float]] = {}

    def challenge(self, node_id: str) -> dict[str, Any]:
        """A fresh nonce for `node_id` (replacing any earlier one)."""
        nonce = secrets.token_urlsafe(24)
        expires = self._clock() + NONCE_TTL_S
        with self._lock:
            self._nonces[node_id] = (nonce, expires)
        return {"nonce": nonce, "expires_at": expires}

    def submit(
        self,
        node_id: str,
        raw_report: dict[str, Any],
        signature: str,
        certificate_der: bytes,
        quote: Mapping[str, Any] | None = None,
    ) -> Verdict:
        """Check a signed (and, from a node with a registered TPM, quoted) report and record the verdict (the
        nonce is spent either way).

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
            quote_error = pcr_problem = None
            if verdict.attested and node.tpm_ak is not None and quote is not None:
                from strata.trust.tpm_verify import check_pcr_policy, verify_quote

                try:
                    node.tpm_pcrs = verify_quote(node.tpm_ak, quote, hashlib.sha256(report.payload()).digest())
                    pcr_problem = check_pcr_policy(node.tpm_pcrs, self.tpm_pcrs)
                except AuthError as exc:
                    quote_error = str(exc)
            verdict = judge_tpm(verdict, node.tpm_ak is not None, quote is not None, quote_error, pcr_problem)
            changed = node.attestation != verdict.level
            node.attestation = verdict.level
            node.attested_at = self._clock()
            node.attestation_detail = verdict.reason
        if changed:
            self._feed.bump()  # placement policies that require attestation now decide differently
        return verdict

    def tpm_challenge(self, node_id: str, ek_public: str, ek_certificate: str | None, ak_public: str) -> dict[str, Any]:
        """Check a node's TPM (its EK certificate and AK) and challenge it to activate a credential.

        Raises:
            AuthError: the EK is not certified by a trusted manufacturer CA, or the AK is not an attestation key.
            Conflict: that TPM is already registered to another node.
            ConfigError: tpm2-pytss is not installed on this server.
        """
        from strata.trust.tpm_verify import make_challenge

        challenge = make_challenge(ek_public, ek_certificate, ak_public, self._tpm_cas, self._clock())
        with self._db.transaction() as session:
            self._check_binding(session, node_id, challenge.ek_fingerprint)
        with self._lock:
            self._tpm_challenges[node_id] = (challenge, self._clock() + NONCE_TTL_S)
        return {
            "credential_blob": challenge.credential_blob,
            "encrypted_secret": challenge.encrypted_secret,
            "ak_name": challenge.ak_name,
            "expires_at": self._clock() + NONCE_TTL_S,
        }

    def tpm_activate(self, node_id: str, secret: str) -> dict[str, Any]:
        """Register the node's AK if it recovered the challenge's secret (one try per challenge).

        Raises:
            AuthError: no challenge is pending, or the secret does not match.
            Conflict: that TPM was registered to another node meanwhile.
            NotFound: no such node.
        """
        from strata.trust.tpm_verify import check_activation

        with self._lock:
            challenge, expires = self._tpm_challenges.pop(node_id, (None, 0.0))
        if challenge is None or expires <= self._clock():
            raise AuthError("no TPM challenge is pending for this node (ask for one, then answer within five minutes)")
        check_activation(challenge, secret)
        with self._db.transaction() as session:
            node = session.get(Node, node_id)
            if node is None or node.revoked_at is not None:
                raise NotFound(f"no node {node_id!r}")
            self._check_binding(session, node_id, challenge.ek_fingerprint)
            node.tpm_ak = challenge.ak_public
            node.tpm_ek = challenge.ek_fingerprint
            node.tpm_pcrs = None
        return {"registered": True, "ak_name": challenge.ak_name, "ek": challenge.ek_fingerprint}

    @staticmethod
    def _check_binding(session: Session, node_id: str, ek_fingerprint: str) -> None:
        """One TPM, one node; and a node stays bound to the TPM it registered first (its identity files copied to
        another machine do not move the binding: the operator enrolls that machine again).

        Raises:
            Conflict: the TPM belongs to another node, or this node to another TPM.
            NotFound: no such node.
        """
        node = session.get(Node, node_id)
        if node is None or node.revoked_at is not None:
            raise NotFound(f"no node {node_id!r}")
        if node.tpm_ek is not None and node.tpm_ek != ek_fingerprint:
            raise Conflict(
                f"this node is bound to another TPM (EK {node.tpm_ek[:16]}..., not {ek_fingerprint[:16]}...); "
                "enroll this machine again"
            )
        owner = session.scalar(select(Node.id).where(Node.tpm_ek == ek_fingerprint))
        if owner is not None and owner != node_id:
            raise Conflict(f"this TPM (EK {ek_fingerprint[:16]}...) is registered to another node")

    @staticmethod
    def require_certificate(certificate_der: bytes | None) -> bytes:
        """Raises:
        AuthError: the report did not come over mutual TLS (nothing to check its signature against).
        """
        if certificate_der is None:
            raise AuthError("attestation reports are sent over mutual TLS with the node's certificate")
        return certificate_der
