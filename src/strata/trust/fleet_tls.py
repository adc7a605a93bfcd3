"""A node's TLS contexts from its trust folder (DATA_DIR/trust, as the agent writes it at enrollment): the agent's
own client context, and those of the processes that act as the node beside it (the verifier child and `strata
gateway`).

`ca.pem` is the fleet CA, `node.pem` and `node.key` the node's certificate and key, `identity.json` its id, its
control plane and its certificate's expiry. Only the standard library's ssl: these processes stay small.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from strata.core.errors import ConfigError

# A node certificate names its node in a URI SAN (no host names: a node is an id, not an address).
NODE_URI_PREFIX: Final = "urn:strata:node:"


def peer_node_id(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The node id a verified peer certificate names in its URI SAN (the standard library's parsed form), or None
    when it names none."""
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    for entry in cert.get("subjectAltName", ()):
        kind, value = entry[0], entry[1]
        if kind == "URI" and isinstance(value, str) and value.startswith(NODE_URI_PREFIX):
            return value.removeprefix(NODE_URI_PREFIX)
    return None


@dataclass(frozen=True)
class NodeTrust:
    """Where a node's trust files are, and what its identity file says."""

    folder: Path
    node_id: str
    server: str

    @classmethod
    def load(cls, data_dir: Path) -> NodeTrust:
        """The trust folder of the node whose data folder is `data_dir`.

        Raises:
            ConfigError: the node is not enrolled, or its identity file is damaged.
        """
        folder = data_dir / "trust"
        try:
            raw = json.loads((folder / "identity.json").read_text())
            return cls(folder, str(raw["node_id"]), str(raw["server"]))
        except FileNotFoundError:
            raise ConfigError(f"{data_dir} holds no enrolled node (no trust/identity.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{folder / 'identity.json'} is unreadable: {exc}") from exc

    @property
    def stamp(self) -> tuple[float, ...]:
        """Changes when the certificate or key is replaced (the agent renews its certificate on its own)."""
        try:
            return tuple((self.folder / name).stat().st_mtime for name in ("node.pem", "node.key", "ca.pem"))
        except OSError:
            return ()

    def client_context(self) -> ssl.SSLContext:
        """For the control plane: check it against the fleet CA (and its host name), present the node's certificate.

        Raises:
            ConfigError: the files do not load.
        """
        return node_client_context(self.folder)

    def peer_context(self) -> ssl.SSLContext:
        """For other nodes (a parent's tier port): their certificates name node ids, not hosts, so the chain to
        the fleet CA is checked but not the host name."""
        context = self.client_context()
        context.check_hostname = False
        return context


def node_client_context(folder: Path) -> ssl.SSLContext:
    """A client context trusting the fleet CA in `folder` and presenting the node certificate kept there.

    Raises:
        ConfigError: the files do not load (missing, damaged, or a certificate for another key).
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=folder / "ca.pem")
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(folder / "node.pem", folder / "node.key")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"this node's TLS files in {folder} do not load: {exc}") from exc
    return context
