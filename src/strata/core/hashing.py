"""sha256 helpers and the canonical JSON form that digests are taken over."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    """Return (hex sha256, size in bytes) of the file at `path`, read in 1 MiB pieces.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def canonical_json(obj: Any) -> bytes:
    """The one byte form of a JSON value that digests and signatures are computed over.

    Sorted keys, no insignificant white space, ASCII only, no NaN or infinity.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def digest_json(obj: Any) -> str:
    """`sha256:<hex>` of the canonical JSON of `obj`."""
    return "sha256:" + sha256_bytes(canonical_json(obj))


def is_hex_sha256(value: str) -> bool:
    """True when `value` is 64 lower-case hexadecimal characters."""
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)
