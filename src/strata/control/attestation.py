"""Node attestation on the control plane: issue one-time nonces, check signed reports, record the verdict.

A node asks for a nonce, signs a report of what it runs with its node key, and sends it over mutual TLS; the
signature must verify under the certificate it connected with, the nonce must be the one just issued to it
(one use, five minutes), and its agent code must be on the release allowlist. The verdict is stored on the node:
placement policies that require attestation read it, so a node that fails stops receiving such models.

A node with a TPM first registers its attestation key (AK): its EK certificate must come from a TPM manufacturer
CA the server trusts (`--tpm-ca`), and it must recover a secret encrypted to that EK for that AK (credential
activation, see `strata.trust.tpm_verify`). From then on every report must carry a quote by that AK over the
report's hash; a good quote (and PCR values matching `--tpm-pcr`, if any) earns level `tpm`.

Pending nonces and activation challenges are rows of `attestation_challenges`, not process memory: any replica
may issue one and any replica may take the answer, and the answer claims the row with a conditional DELETE (the
row as it was read), so a nonce or a challenge is used once across every replica. Of an activation challenge only
the sha256 of its secret is kept.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from strata.control.db import AttestationChallenge, Database, Node
from strata.control.feed import ChangeFeed, ThrottledBump
from strata.core.attest import NONCE_TTL_S, Report, Verdict, judge, judge_tpm, parse_pcr_requirements
from strata.core.errors import AuthError, Conflict, NotFound
from strata.trust.attestation import verify_signature

NONCE: Final = "nonce"
TPM: Final = "tpm"
# A node's changed verdict wakes every long poll of the fleet (placement may depend on it): at most once in this
# many seconds, so a node flipping its own verdict in a loop cannot make the control plane do a fleet's work each time.
VERDICT_BUMP_S: Final = 5.0


class AttestationService:
    """Pending nonces and challenges, and verdicts, in the database (see the module docstring)."""

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
        self._bump = ThrottledBump(feed, VERDICT_BUMP_S)
        self._clock = clock
        self.allowlist = frozenset(allowlist)
        self.tpm_pcrs = parse_pcr_requirements(tpm_pcrs)
        self._tpm_cas: tuple[Any, ...] = ()
        if tpm_cas:
            from strata.trust.tpm_verify import load_manufacturer_cas

            self._tpm_cas = load_manufacturer_cas(tuple(tpm_cas))

    def _pend(self, node_id: str, kind: str, value: str, expires: float) -> None:
        """Store a pending challenge of `node_id`, replacing its earlier one of that kind (and dropping expired
        ones of every node).

        Raises:
            StoreError: the database failed.
        """
        row = {"node_id": node_id, "kind": kind, "value": value, "expires_at": expires}
        with self._db.transaction() as session:
            session.execute(delete(AttestationChallenge).where(AttestationChallenge.expires_at <= self._clock()))
            dialect = session.get_bind().dialect.name
            if dialect in ("postgresql", "sqlite"):
                insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
                statement = insert(AttestationChallenge).values(**row)
                session.execute(
                    statement.on_conflict_do_update(
                        index_elements=["node_id", "kind"],
                        set_={"value": statement.excluded.value, "expires_at": statement.excluded.expires_at},
                    )
                )
            else:
                session.execute(
                    delete(AttestationChallenge).where(
                        AttestationChallenge.node_id == node_id, AttestationChallenge.kind == kind
                    )
                )
                session.add(AttestationChallenge(**row))

    def _claim(self, node_id: str, kind: str) -> str | None:
        """Take `node_id`'s pending challenge of `kind` for good and return its value, if it has one that has not
        expired. Of two replicas answering the same challenge at once, one gets it.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            row = session.execute(
                select(AttestationChallenge.value, AttestationChallenge.expires_at).where(
                    AttestationChallenge.node_id == node_id, AttestationChallenge.kind == kind
                )
            ).first()
            if row is None:
                return None
            claimed = session.connection().execute(
                delete(AttestationChallenge).where(
                    AttestationChallenge.node_id == node_id,
                    AttestationChallenge.kind == kind,
                    AttestationChallenge.value == row.value,
                )
            )
            if claimed.rowcount != 1:
                return None
        return row.value if row.expires_at > self._clock() else None

    def challenge(self, node_id: str) -> dict[str, Any]:
        """A fresh nonce for `node_id` (replacing any earlier one).

        Raises:
            StoreError: the database failed.
        """
        nonce = secrets.token_urlsafe(24)
        expires = self._clock() + NONCE_TTL_S
        self._pend(node_id, NONCE, nonce, expires)
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
        issued = self._claim(node_id, NONCE)
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
            self._bump()  # placement policies that require attestation now decide differently
        return verdict

    def tpm_challenge(self, node_id: str, ek_public: str, ek_certificate: str | None, ak_public: str) -> dict[str, Any]:
        """Check a node's TPM (its EK certificate and AK) and challenge it to activate a credential.

        Raises:
            AuthError: the EK is not certified by a trusted manufacturer CA, or the AK is not an attestation key.
            Conflict: that TPM is already registered to another node.
            ConfigError: tpm2-pytss is not installed on this server.
            StoreError: the database failed.
        """
        from strata.trust.tpm_verify import make_challenge

        challenge = make_challenge(ek_public, ek_certificate, ak_public, self._tpm_cas, self._clock())
        with self._db.transaction() as session:
            self._check_binding(session, node_id, challenge.ek_fingerprint)
        kept = dataclasses.replace(challenge, secret=hashlib.sha256(challenge.secret).digest())
        self._pend(node_id, TPM, _challenge_json(kept), self._clock() + NONCE_TTL_S)
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
            StoreError: the database failed.
        """
        from strata.trust.tpm_verify import check_activation

        kept = self._claim(node_id, TPM)
        if kept is None:
            raise AuthError("no TPM challenge is pending for this node (ask for one, then answer within five minutes)")
        challenge = _challenge_of(kept)
        try:
            answer = base64.b64decode(secret, validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise AuthError(f"the activated secret is not base64: {exc}") from exc
        # Only the secret's hash is kept: compare hashes.
        check_activation(challenge, base64.b64encode(hashlib.sha256(answer).digest()).decode())
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


def _challenge_json(challenge: Any) -> str:
    """A TPM challenge (whose `secret` is already the secret's sha256) as stored."""
    fields = dataclasses.asdict(challenge)
    fields["secret"] = fields["secret"].hex()
    return json.dumps(fields, sort_keys=True)


def _challenge_of(stored: str) -> Any:
    """Raises:
    AuthError: the stored challenge does not parse (written by another release).
    """
    from strata.trust.tpm_verify import Challenge

    try:
        fields = json.loads(stored)
        fields["secret"] = bytes.fromhex(fields["secret"])
        return Challenge(**fields)
    except (ValueError, TypeError, KeyError) as exc:
        raise AuthError("the pending TPM challenge is unreadable; ask for a new one") from exc
