"""Content-defined chunking (FastCDC) of large package files, so a new version that changes a few weights
moves only the chunks it changed.

Chunk boundaries depend on the content, not on offsets: an edit shifts or replaces only the chunks it
touches. Each chunk is named by its sha256; a manifest lists a large file's chunks in order, so a node can
rebuild the file from chunks it already holds (in earlier packages) and chunks it downloads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from strata.core.errors import PackageError

MIN_SIZE: Final = 16 << 10
AVG_SIZE: Final = 64 << 10
MAX_SIZE: Final = 256 << 10
CHUNK_FILES_FROM: Final = MAX_SIZE  # smaller files travel whole


@dataclass(frozen=True)
class Chunk:
    """A piece of a file: its sha256 (hex) and length; its offset is the sum of the lengths before it."""

    sha256: str
    size: int


def chunk_bytes(data: bytes | memoryview) -> list[Chunk]:
    """FastCDC chunks of `data` (16 KiB min, 64 KiB average, 256 KiB max), in order."""
    from fastcdc import fastcdc

    view = memoryview(data)
    return [
        Chunk(hashlib.sha256(view[c.offset : c.offset + c.length]).hexdigest(), c.length)
        for c in fastcdc(bytes(view), min_size=MIN_SIZE, avg_size=AVG_SIZE, max_size=MAX_SIZE, fat=False, hf=None)
    ]


def chunk_file(path: Path) -> list[Chunk]:
    """Chunks of a file; empty for files under CHUNK_FILES_FROM bytes (those travel whole).

    Raises:
        PackageError: the file cannot be read.
    """
    try:
        if path.stat().st_size < CHUNK_FILES_FROM:
            return []
        return chunk_bytes(path.read_bytes())
    except OSError as exc:
        raise PackageError(f"cannot chunk {path}: {exc}") from exc


def offsets(chunks: Sequence[Chunk]) -> Iterator[tuple[int, Chunk]]:
    """(offset, chunk) for each chunk of a file, in order."""
    position = 0
    for chunk in chunks:
        yield position, chunk
        position += chunk.size
