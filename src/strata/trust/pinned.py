"""The supply-chain trust a node pins at enrollment, and where it keeps it: pure data and file layout, no crypto.

Under the agent's data folder:
    trust/pinned.json        {"release_keys": [PEM, ...], "tuf_roots": {"image": ROOT, "director": ROOT}}
    trust/tuf/image/         the image repository's trusted metadata (python-tuf's Updater cache)
    trust/tuf/director/      this node's director metadata (same)

Written once, atomically, when the node enrolls; read by the verifying child process (`strata.trust.verify`). A node
without `pinned.json` enrolled with a server that had no release keys: it accepts unsigned packages and says so.
The agent imports this module, so it must stay free of cryptography and tuf.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from strata.core.errors import ConfigError
from strata.core.fsutil import write_json_atomic

TRUST_DIR: Final = "trust"
PINNED_NAME: Final = "pinned.json"
REPOSITORIES: Final = ("image", "director")


@dataclass(frozen=True)
class PinnedTrust:
    """Release public keys (PEM) and the TUF root metadata (JSON text) of each repository."""

    release_keys: tuple[str, ...]
    tuf_roots: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"release_keys": list(self.release_keys), "tuf_roots": dict(self.tuf_roots)}

    @classmethod
    def from_json(cls, raw: Any) -> PinnedTrust:
        """Raises:
        ConfigError: malformed, or without release keys or a root for each repository.
        """
        if not isinstance(raw, dict):
            raise ConfigError("pinned trust must be a JSON object")
        keys, roots = raw.get("release_keys"), raw.get("tuf_roots")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError("pinned trust has no release keys")
        if not isinstance(roots, dict) or any(not isinstance(roots.get(repo), str) for repo in REPOSITORIES):
            raise ConfigError(f"pinned trust needs the TUF root of each of {list(REPOSITORIES)}")
        return cls(release_keys=tuple(keys), tuf_roots={repo: roots[repo] for repo in REPOSITORIES})


def trust_dir(data_dir: Path) -> Path:
    """The folder of a node's pinned trust and TUF metadata."""
    return data_dir / TRUST_DIR


def metadata_dir(data_dir: Path, repository: str) -> Path:
    """Where the Updater of `repository` keeps the node's trusted metadata."""
    return trust_dir(data_dir) / "tuf" / repository


def save_pinned(data_dir: Path, release_keys: Sequence[str], tuf_roots: Mapping[str, str]) -> PinnedTrust:
    """Pin what the server handed out at enrollment (replacing what an earlier enrollment pinned).

    A new pin starts the TUF metadata afresh from the given roots.

    Raises:
        ConfigError: keys without both roots.
        OSError: the file cannot be written.
    """
    pinned = PinnedTrust.from_json({"release_keys": list(release_keys), "tuf_roots": dict(tuf_roots)})
    folder = trust_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for repository in REPOSITORIES:
        shutil.rmtree(metadata_dir(data_dir, repository), ignore_errors=True)
    write_json_atomic(folder / PINNED_NAME, pinned.to_json())
    return pinned


def load_pinned(data_dir: Path) -> PinnedTrust | None:
    """The node's pinned trust; None when it enrolled without release keys (development).

    Raises:
        ConfigError: the file exists but is unreadable or malformed (the node refuses rather than guess).
    """
    path = trust_dir(data_dir) / PINNED_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); enroll the node again") from exc
    return PinnedTrust.from_json(raw)


def is_pinned(data_dir: Path) -> bool:
    """True when the node pinned release keys (a stat, no parsing: the agent asks this often)."""
    return (trust_dir(data_dir) / PINNED_NAME).is_file()
