"""Node-side key operations, run as a short-lived child process so the agent never loads `cryptography`:

    python -m strata.trust.node csr KEY_PATH NODE_NAME      -> a PEM CSR on stdout; the key made if missing
    python -m strata.trust.node check-cert CERT KEY CA      -> JSON {node_id, not_after} or an error
    python -m strata.trust.node sign KEY_PATH < PAYLOAD     -> base64 ECDSA-SHA256 signature of stdin

The node's private key is made here, on the node, and never leaves it.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from strata.core.fsutil import write_bytes_atomic
from strata.trust.ca import node_id_of


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The node's EC P-256 key, made (mode 0600) on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC key")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_bytes_atomic(path, pem, mode=0o600)
    return key


def make_csr(key_path: Path, name: str) -> bytes:
    """A PEM certificate request over the node's key (made if missing)."""
    key = load_or_create_key(key_path)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def check_certificate(cert_path: Path, key_path: Path, ca_path: Path) -> dict[str, object]:
    """The node id and expiry of a stored certificate, after checking it matches the key and the CA."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = load_or_create_key(key_path)
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    if cert.public_key() != key.public_key():
        raise ValueError("the certificate is not for this node's key")
    cert.verify_directly_issued_by(ca)
    return {"node_id": node_id_of(cert), "not_after": cert.not_valid_after_utc.timestamp()}


def sign(key_path: Path, payload: bytes) -> str:
    """Base64 ECDSA (SHA-256, DER) signature of `payload` with the node's key."""
    key = load_or_create_key(key_path)
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def main(argv: list[str]) -> int:
    try:
        match argv:
            case ["csr", key_path, name]:
                sys.stdout.write(make_csr(Path(key_path), name).decode())
            case ["sign", key_path]:
                sys.stdout.write(sign(Path(key_path), sys.stdin.buffer.read()))
            case ["check-cert", cert, key, ca]:
                sys.stdout.write(json.dumps(check_certificate(Path(cert), Path(key), Path(ca))))
            case _:
                sys.stderr.write("usage: python -m strata.trust.node csr KEY NAME | check-cert CERT KEY CA\n")
                return 2
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
