"""Every knob of the control plane in one frozen object: where it keeps its data, its limits and its clock."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from sqlalchemy import URL

from strata.trust.expiry import Expiries

# The longest a node may hold a desired-state long poll open; agents ask for less and poll again.
MAX_WAIT_S: Final = 60.0


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one control plane process.

    Attributes:
        data_dir: holds `strata.db` (unless `db_url` says otherwise), `blobs/`, `tmp/` and `admin.token`.
        db_url: an SQLAlchemy URL (`postgresql://` means psycopg 3); None means the SQLite file
            `data_dir/strata.db`. Left out of the repr: it may hold a password.
        online_window_s: a node is online when it was last seen within this many seconds.
        presence_flush_s: how often the in-memory `last_seen` times (and operator tokens' `last_used_at`) are
            written to the database.
        max_package_bytes: the largest package tar `POST /v1/packages` accepts.
        rollout_interval_s: the rollout driver steps at least this often (and soon after status reports).
        rollout_debounce_s: after a status report, wait this long for others before stepping.
        clock: epoch seconds; every stored time comes from it, so tests can move time.
        telemetry_retention_s: node telemetry (minutes, events, drift counts) older than this is deleted.
        telemetry_sweep_s: how often the replica holding the rollout lease deletes expired telemetry (and events).
        event_retention_s: fleet events (`strata events`, rollout timelines) older than this are deleted.
        otlp_endpoint: when set, stored telemetry is also forwarded to this OpenTelemetry collector (OTLP/HTTP).
        otlp_queue_bytes: the most that telemetry waiting for that collector may hold (an upper bound on the OTLP
            requests it becomes); batches past it are left out of the export and counted.
        tls_names: DNS names and addresses the HTTPS certificate covers (default: loopback and this host).
        node_cert_hours: lifetime of node certificates (30 days: a node cut off for weeks comes back without
            being enrolled again; revoking a node cuts it off at once whatever is left); agents renew them once a
            third of it is left.
        agent_allowlist: agent code hashes nodes may attest to (default: this server's own release).
        release_keys: release public keys (PEM files); with any, uploads must be signed by one and nodes pin them.
        tuf_expiries: lifetimes of the TUF metadata the server signs.
        tpm_cas: TPM manufacturer CA certificates (PEM files); nodes whose EK certificate one of them issued may
            register a TPM attestation key and attest at level `tpm`.
        tpm_pcrs: PCR values a `tpm` attestation requires, each `BANK:INDEX=HEX` (e.g. `sha256:7=...`).
        cloud_endpoints: Open Inference Protocol servers that take overflow inference from every node (any OIP
            server: a cloud-tier strata agent, Triton, KServe); nodes learn them from their topology.
    """

    data_dir: Path
    db_url: str | None = field(default=None, repr=False)  # it may hold a password
    online_window_s: float = 90.0
    presence_flush_s: float = 15.0
    max_package_bytes: int = 8 << 30
    rollout_interval_s: float = 5.0
    rollout_debounce_s: float = 0.5
    clock: Callable[[], float] = time.time
    telemetry_retention_s: float = 90 * 86400.0  # what the telemetry API reaches back
    telemetry_sweep_s: float = 3600.0
    event_retention_s: float = 365 * 86400.0
    otlp_endpoint: str | None = None
    otlp_queue_bytes: int = 64 << 20
    tls_names: tuple[str, ...] = ()
    node_cert_hours: float = 30 * 24.0
    agent_allowlist: tuple[str, ...] = ()
    release_keys: tuple[Path, ...] = ()
    tuf_expiries: Expiries = field(default_factory=Expiries)
    cloud_endpoints: tuple[str, ...] = ()
    tpm_cas: tuple[Path, ...] = ()
    tpm_pcrs: tuple[str, ...] = ()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL in use."""
        if self.db_url:
            return self.db_url
        return URL.create("sqlite", database=str(self.data_dir / "strata.db")).render_as_string()

    @property
    def blobs_dir(self) -> Path:
        """Root of the content-addressed blob store."""
        return self.data_dir / "blobs"

    @property
    def scratch_root(self) -> Path:
        """Where every replica sharing this data folder keeps its scratch folder."""
        return self.data_dir / "tmp"

    @property
    def tmp_dir(self) -> Path:
        """This process's scratch space for uploads; on the same file system as the blobs, so a finished upload is
        renamed. One folder per process: replicas sharing the data folder never clear each other's uploads."""
        return self.scratch_root / f"{socket.gethostname()[:64]}.{os.getpid()}"

    @property
    def pki_dir(self) -> Path:
        """The fleet CA's and the server's keys and certificates."""
        return self.data_dir / "pki"

    @property
    def ca_path(self) -> Path:
        """The fleet CA certificate, for operators (`--ca`) and for pinning in enrollment tokens."""
        return self.data_dir / "ca.pem"

    @property
    def tuf_keys_dir(self) -> Path:
        """The TUF role keys of both repositories (PKCS#8 PEM files, mode 0600), made on first start."""
        return self.data_dir / "tuf" / "keys"

    @property
    def admin_token_path(self) -> Path:
        """Where the operator's admin token is written on first start (mode 0600)."""
        return self.data_dir / "admin.token"
