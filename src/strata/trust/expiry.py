"""How long each kind of TUF metadata stays valid: one typed object, free of heavy imports (server settings hold it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DAY: Final = 86400.0


@dataclass(frozen=True)
class Expiries:
    """Lifetimes in seconds. The server re-signs its online roles when less than half of a lifetime is left, so a
    node never sees valid metadata expire while the server is up; a mirror that freezes it is caught within a day.

    Attributes:
        root_s: both repositories' root (signed once, with the root keys).
        targets_s: the image repository's top-level targets and each node's director targets (online keys).
        snapshot_s: snapshots (online keys).
        timestamp_s: timestamps (online keys): the freshness window.
        release_s: a package's release-signed role (the default of `strata model sign --expires`).
    """

    root_s: float = 3650 * DAY
    targets_s: float = 30 * DAY
    snapshot_s: float = 7 * DAY
    timestamp_s: float = DAY
    release_s: float = 365 * DAY

    def of(self, role: str) -> float:
        """The lifetime of a top-level role's metadata (`root`, `targets`, `snapshot` or `timestamp`)."""
        return float(getattr(self, f"{role}_s"))
