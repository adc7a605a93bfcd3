"""Checking an attestation report's signature against the node's certificate (control plane side)."""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from strata.core.attest import Report
from strata.core.errors import AuthError


def verify_signature(report: Report, signature_b64: str, certificate_der: bytes) -> None:
    """Check that the node holding the certificate's key signed the report.

    Raises:
        AuthError: the signature does not verify, or the certificate's key is not EC.
    """
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        key = x509.load_der_x509_certificate(certificate_der).public_key()
    except (binascii.Error, ValueError) as exc:
        raise AuthError(f"the attestation signature or certificate does not parse: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AuthError("node certificates carry EC keys")
    try:
        key.verify(signature, report.payload(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise AuthError("the attestation report is not signed by this node's key") from exc
