"""The fleet certificate authority: a self-signed EC P-256 CA that issues the control plane's server
certificate and short-lived node certificates from CSRs made on the nodes.

A node certificate names its node id twice: as the subject's common name and as the URI SAN
`urn:strata:node:<id>`; the control plane authorizes by that id. Enrollment tokens carry the sha256 of the CA
certificate, so a node never trusts a control plane it was not told about (as kubeadm's discovery hash does).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from strata.core.errors import AuthError, ConfigError
from strata.core.fsutil import write_bytes_atomic
from strata.trust.fleet_tls import NODE_URI_PREFIX

CA_YEARS: Final = 10
SERVER_DAYS: Final = 397
NODE_HOURS: Final = 30 * 24
# Every certificate is valid from a day before it is made: a node whose clock is behind the control plane's (booted
# without its real-time clock, or set by hand) still takes a fresh server certificate, and the fleet CA itself.
_SKEW: Final = dt.timedelta(days=1)


_CA_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of a certificate's DER encoding (what enrollment tokens pin)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "strata"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def node_id_of(cert: x509.Certificate) -> str | None:
    """The node id a certificate names (its URI SAN), or None when it names none."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(NODE_URI_PREFIX):
            return uri.removeprefix(NODE_URI_PREFIX)
    return None


def same_key(der: bytes, pem: bytes) -> bool:
    """Whether a certificate (DER) and another (PEM) are over the same public key; False for either unreadable."""
    try:
        first = x509.load_der_x509_certificate(der).public_key()
        second = x509.load_pem_x509_certificate(pem).public_key()
    except ValueError:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return first.public_bytes(*spki) == second.public_bytes(*spki)


def csr_over_key_of(csr_pem: str, der: bytes) -> bool:
    """Whether a certificate request (PEM) is over the same public key as a certificate (DER); False for either
    unreadable."""
    try:
        asked = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
        held = x509.load_der_x509_certificate(der).public_key()
    except ValueError:
        return False
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return asked.public_bytes(*spki) == held.public_bytes(*spki)


def node_id_of_der(der: bytes) -> str | None:
    """The node id a certificate (DER) names, or None when it names none or does not parse."""
    try:
        return node_id_of(x509.load_der_x509_certificate(der))
    except ValueError:
        return None


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    serial: int
    not_after: float
    issued_at: float = 0.0  # the CA's clock when it signed: with not_after, the life it gave (on one clock)


class FleetCA:
    """The CA's key and certificate, and what it signs."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return _cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    @classmethod
    def create(cls, name: str, now: dt.datetime) -> FleetCA:
        """A new CA valid for ten years."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW)
            .not_valid_after(now + dt.timedelta(days=365 * CA_YEARS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, folder: Path, now: dt.datetime) -> FleetCA:
        """The CA kept in `folder` (ca.key, ca.pem), made on first use.

        Raises:
            ConfigError: the files exist but do not load, or do not belong together.
        """
        key_path, cert_path = folder / "ca.key", folder / "ca.pem"
        if not key_path.exists() and not cert_path.exists():
            ca = cls.create(f"strata fleet CA {secrets.token_hex(4)}", now)
            write_bytes_atomic(key_path, _key_pem(ca._key), mode=0o600)
            write_bytes_atomic(cert_path, ca.cert_pem)
            return ca
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"the fleet CA in {folder} does not load: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise ConfigError(f"{key_path} is not the key of {cert_path}")
        return cls(key, cert)

    def _issue(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        sans: list[x509.GeneralName],
        usages: list[x509.ObjectIdentifier],
        now: dt.datetime,
        lifetime: dt.timedelta,
    ) -> IssuedCertificate:
        serial = x509.random_serial_number()
        not_after = now + min(lifetime, self.cert.not_valid_after_utc - now)  # no overflow past the CA's own end
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - _SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(_cert_pem(cert), serial, not_after.timestamp(), now.timestamp())

    def server_certificate(self, names: Iterable[str], now: dt.datetime) -> tuple[bytes, bytes]:
        """A new key and a certificate for the control plane under these DNS names and IP addresses."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in dict.fromkeys(names):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        issued = self._issue(
            _name("strata control plane"),
            key.public_key(),
            sans,
            [ExtendedKeyUsageOID.SERVER_AUTH],
            now,
            dt.timedelta(days=SERVER_DAYS),
        )
        return _key_pem(key), issued.pem

    def sign_node_csr(
        self, csr_pem: bytes, node_id: str, now: dt.datetime, hours: float = NODE_HOURS
    ) -> IssuedCertificate:
        """A short-lived certificate for `node_id` over the key in a CSR the node made.

        The CSR's own subject is ignored: the certificate names the node the control plane knows. It may serve
        (the node's tier port) and authenticate as a client.

        Raises:
            AuthError: the CSR does not parse, is not signed by its key, or is not an EC P-256 key.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise AuthError(f"the certificate request does not parse: {exc}") from exc
        if not csr.is_signature_valid:
            raise AuthError("the certificate request is not signed by its own key")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp256r1":
            raise AuthError("node keys must be EC P-256")
        return self._issue(
            _name(node_id),
            public_key,
            [x509.UniformResourceIdentifier(NODE_URI_PREFIX + node_id)],
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
            now,
            dt.timedelta(hours=hours),
        )

    def verify(self, cert: x509.Certificate) -> None:
        """Check that `cert` was signed by this CA (TLS checks the rest: validity, usage).

        Raises:
            AuthError: it was not.
        """
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise AuthError(f"certificate not issued by this fleet's CA: {exc}") from exc
