"""The node's fleet identity: its key, its certificate and the fleet CA, and the TLS contexts built from them.

Files under DATA_DIR/trust: `ca.pem` (the fleet CA, trusted because its sha256 matched the one the enrollment
token carried), `node.key` (made here by a child process, mode 0600, never sent anywhere), `node.pem` (the
certificate the control plane signed), and `identity.json` (node id, server, certificate expiry, and when this node
received it, by its clock: how long the certificate lives, for its renewal).
Key generation and CSRs run in `python -m strata.trust.node` so the agent never imports `cryptography`; TLS
itself is the standard library's `ssl`.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from strata.agent.children import run_module
from strata.core.errors import AuthError, ConfigError
from strata.core.fsutil import write_bytes_atomic, write_json_atomic
from strata.trust.fleet_tls import node_client_context

ENROLLMENT_FORMAT: Final = "stk1"


def parse_enrollment_token(token: str) -> tuple[str, str]:
    """(the token, the fleet CA's sha256 hex it pins).

    Raises:
        ConfigError: not a strata enrollment token (`stk1.<secret>.<ca sha256>`).
    """
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != ENROLLMENT_FORMAT or len(parts[2]) != 64:
        raise ConfigError(
            "the enrollment token is not stk1.<secret>.<CA sha256>; copy it whole from `strata token create`"
        )
    return token.strip(), parts[2].lower()


def pem_fingerprint(pem: str) -> str:
    """Hex sha256 of a PEM certificate's DER (computed with the standard library)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


@dataclass(frozen=True)
class StoredIdentity:
    server: str
    node_id: str
    not_after: float  # by the server's clock
    received_at: float | None = None  # by this node's clock; None in an identity.json from before it was kept
    issued_at: float | None = None  # by the server's clock; None from a server (or an identity.json) before it

    @property
    def life(self) -> float | None:
        """The life the server gave the certificate (both ends on its clock), None where it did not say."""
        return self.not_after - self.issued_at if self.issued_at is not None and self.received_at is not None else None

    @property
    def expires_at(self) -> float:
        """When the certificate ends, by this node's clock: its life counted from its receipt (a node whose clock
        is wrong by weeks still renews in time and not over and over), else the server's date as it stands."""
        life = self.life
        if life is None or self.received_at is None:
            return self.not_after
        return self.received_at + life

    def renew_at(self, renew_before_s: float) -> float:
        """When to renew, by this node's clock: once a third of the certificate's life is left, and at least
        `renew_before_s` before it ends (all of that where the life is not known)."""
        life = self.life or 0.0
        return self.expires_at - max(renew_before_s, life / 3)


class FleetIdentity:
    """The trust files of one node and the TLS contexts over them."""

    def __init__(self, data_dir: Path) -> None:
        self.folder = data_dir / "trust"
        self.ca_path = self.folder / "ca.pem"
        self.key_path = self.folder / "node.key"
        self.cert_path = self.folder / "node.pem"
        self.state_path = self.folder / "identity.json"

    def load(self) -> StoredIdentity | None:
        """The stored identity, or None before enrollment.

        Raises:
            ConfigError: the files are there but damaged.
        """
        if not self.state_path.exists():
            return None
        try:
            raw = json.loads(self.state_path.read_text())
            received, issued = raw.get("received_at"), raw.get("issued_at")
            stored = StoredIdentity(
                str(raw["server"]),
                str(raw["node_id"]),
                float(raw["not_after"]),
                float(received) if received is not None else None,
                float(issued) if issued is not None else None,
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.state_path} is unreadable ({exc}); enroll again with a new token") from exc
        for path in (self.ca_path, self.key_path, self.cert_path):
            if not path.exists():
                raise ConfigError(f"{path} is missing; enroll again with a new token")
        return stored

    def trust_ca(self, pem: str, pinned_hex: str) -> None:
        """Keep the fleet CA if it is the one the enrollment token pins.

        Raises:
            AuthError: it is not (the server is not the one the token was made for).
        """
        if pem_fingerprint(pem) != pinned_hex:
            raise AuthError("the server's CA does not match the one the enrollment token pins; refusing to trust it")
        write_bytes_atomic(self.ca_path, pem.encode())

    def make_csr(self, name: str) -> str:
        """A certificate request over this node's key (made on first use), from a child process.

        Raises:
            ConfigError: the key operation failed.
        """
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        what = "making this node's key and certificate request"
        return run_module("strata.trust.node", ["csr", str(self.key_path), name], timeout_s=120, what=what).decode()

    def sign(self, payload: bytes) -> str:
        """A base64 ECDSA signature of `payload` with the node key, from a child process.

        Raises:
            ConfigError: the key operation failed.
        """
        what = "signing with this node's key"
        signature = run_module("strata.trust.node", ["sign", str(self.key_path)], payload, timeout_s=120, what=what)
        return signature.decode().strip()

    def save(
        self,
        server: str,
        node_id: str,
        certificate: str,
        not_after: float,
        received_at: float,
        issued_at: float | None = None,
    ) -> StoredIdentity:
        """Store a certificate from enrollment or renewal (it must be for this node's key), received at
        `received_at` by this node's clock, issued at `issued_at` by the server's."""
        write_bytes_atomic(self.cert_path, certificate.encode())
        stored = StoredIdentity(server, node_id, not_after, received_at, issued_at)
        raw = {
            "server": server,
            "node_id": node_id,
            "not_after": not_after,
            "received_at": received_at,
            "issued_at": issued_at,
        }
        write_json_atomic(self.state_path, raw, mode=0o600)
        return stored

    def client_context(self) -> ssl.SSLContext:
        """For calls to the control plane and to other nodes: verify them against the fleet CA, present our cert.

        Raises:
            ConfigError: the files do not load (damaged, or a certificate for another key).
        """
        return node_client_context(self.folder)

    def bootstrap_context(self) -> ssl.SSLContext:
        """Verify the control plane against the fleet CA, without a client certificate (enrollment).

        Raises:
            ConfigError: the CA file does not load.
        """
        # the fleet CA alone: not the system's public CAs too (they are not to vouch for the control plane, and
        # loading them costs the agent 2.4 MB of heap that glibc keeps)
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"the fleet CA in {self.ca_path} does not load: {exc}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def peer_context(self) -> ssl.SSLContext:
        """For calls to other nodes (parent relay, tier port): their certificates name node ids, not host names,
        so the chain to the fleet CA is checked but the host name is not."""
        context = self.client_context()
        context.check_hostname = False
        return context

    def server_context(self) -> ssl.SSLContext:
        """For this node's tier port: present our certificate, require one from the fleet CA.

        Raises:
            ConfigError: the files do not load.
        """
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"this node's certificate does not load: {exc}") from exc
        return context


def unverified_context() -> ssl.SSLContext:
    """TLS without verification, for exactly one call: fetching the CA at enrollment, whose bytes are then
    checked against the hash in the token before anything else is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
