"""The control plane's keys and certificates: the fleet CA, its server certificate, and node certificates.

Files under DATA_DIR/pki (keys mode 0600); the CA certificate is also written to DATA_DIR/ca.pem for operators
(`--ca` / STRATA_CA). The server certificate is made again when it nears its end or its names change.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from strata.core.errors import AuthError, ConfigError
from strata.core.fsutil import write_bytes_atomic
from strata.trust.ca import FleetCA, IssuedCertificate

log = logging.getLogger(__name__)

RENEW_SERVER_BEFORE = dt.timedelta(days=30)


def default_server_names(host: str | None = None) -> tuple[str, ...]:
    """The names a server certificate covers by default: loopback, this machine's name, and the bind host."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if host:
        try:
            unspecified = ipaddress.ip_address(host).is_unspecified  # a wildcard bind names no address
        except ValueError:
            unspecified = False
        if not unspecified:
            names.append(host)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ServerTls:
    key_path: Path
    cert_path: Path
    ca_path: Path


class Pki:
    """Loads (or makes) the fleet CA at start and signs node certificates."""

    def __init__(self, folder: Path, public_ca_path: Path, clock: Callable[[], float]) -> None:
        self.folder = folder
        self.public_ca_path = public_ca_path
        self._clock = clock
        self._ca: FleetCA | None = None

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC)

    def start(self) -> FleetCA:
        """Load or create the CA and publish its certificate.

        Raises:
            ConfigError: the CA files do not load.
        """
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._ca = FleetCA.load_or_create(self.folder, self._now())
            write_bytes_atomic(self.public_ca_path, self._ca.cert_pem)
        except OSError as exc:
            raise ConfigError(f"cannot prepare {self.folder}: {exc}") from exc
        return self._ca

    @property
    def ca(self) -> FleetCA:
        if self._ca is None:
            self._ca = self.start()
        return self._ca

    def server_tls(self, names: Iterable[str]) -> ServerTls:
        """Key and certificate files for the HTTPS listener, made again when expiring or renamed."""
        key_path, cert_path = self.folder / "server.key", self.folder / "server.pem"
        wanted = sorted(dict.fromkeys(names))
        current = self._server_names(cert_path)
        if current != wanted:
            key, cert = self.ca.server_certificate(wanted, self._now())
            write_bytes_atomic(key_path, key, mode=0o600)
            write_bytes_atomic(cert_path, cert)
            log.info("issued the control plane's certificate for %s", ", ".join(wanted))
        return ServerTls(key_path, cert_path, self.public_ca_path)

    def _server_names(self, cert_path: Path) -> list[str] | None:
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            self.ca.verify(cert)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (OSError, ValueError, AuthError, x509.ExtensionNotFound):  # missing, unreadable, another CA's
            return None
        if cert.not_valid_after_utc - self._now() < RENEW_SERVER_BEFORE:
            return None
        names = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        names += sans.get_values_for_type(x509.DNSName)
        return sorted(names)

    def sign_node(self, csr_pem: str, node_id: str, hours: float) -> IssuedCertificate:
        """A node certificate (see FleetCA.sign_node_csr).

        Raises:
            AuthError: the CSR is unusable.
        """
        return self.ca.sign_node_csr(csr_pem.encode(), node_id, self._now(), hours)
