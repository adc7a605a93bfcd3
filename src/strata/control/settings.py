"""Every knob of the control plane in one frozen object: where it keeps its data, its limits and its clock."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import URL

# The longest a node may hold a desired-state long poll open; agents ask for less and poll again.
MAX_WAIT_S: Final = 60.0


@dataclass(frozen=True)
class ServerSettings:
    """Settings of one control plane process.

    Attributes:
        data_dir: holds `strata.db` (unless `db_url` says otherwise), `blobs/`, `tmp/` and `admin.token`.
        db_url: any SQLAlchemy URL; None means the SQLite file `data_dir/strata.db`.
        online_window_s: a node is online when it was last seen within this many seconds.
        presence_flush_s: how often the in-memory `last_seen` times are written to the database.
        max_package_bytes: the largest package tar `POST /v1/packages` accepts.
        clock: epoch seconds; every stored time comes from it, so tests can move time.
        otlp_endpoint: when set, stored telemetry is also forwarded to this OpenTelemetry collector (OTLP/HTTP).
        cloud_endpoints: Open Inference Protocol servers that take overflow inference from every node (any OIP
            server: a cloud-tier strata agent, Triton, KServe); nodes learn them from their topology.
    """

    data_dir: Path
    db_url: str | None = None
    online_window_s: float = 90.0
    presence_flush_s: float = 15.0
    max_package_bytes: int = 8 << 30
    clock: Callable[[], float] = time.time
    otlp_endpoint: str | None = None
    cloud_endpoints: tuple[str, ...] = ()

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
    def tmp_dir(self) -> Path:
        """Scratch space for uploads; on the same file system as the blobs, so a finished upload is renamed."""
        return self.data_dir / "tmp"

    @property
    def admin_token_path(self) -> Path:
        """Where the operator's admin token is written on first start (mode 0600)."""
        return self.data_dir / "admin.token"
