"""Resumable, verified downloads of content-addressed blobs.

A download writes `<hex>.part`; after a cut (network or kill -9) the next attempt asks only for the bytes
it lacks (`Range: bytes=<have>-`). The finished file is hashed and renamed to `<hex>` only if its sha256 and
size are what the desired state promised; a blob that fails is deleted and the error says so. With `seal`, the
verified bytes reach `<hex>` already sealed, through a temporary name: a kill at any instant leaves the part
file, or the sealed blob, never a blob in the clear under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from strata.agent.client import raise_for_status
from strata.agent.transport import HttpResponse, Transport
from strata.core.errors import TransportError, VerificationError
from strata.core.fsutil import fsync_dir, write_bytes_atomic

_PIECE = 1 << 16

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class DownloadResult:
    path: Path
    resumed_from: int
    received: int


class RateLimiter:
    """Keeps a byte stream under `rate` bytes per second (a thin uplink is shared with the workload)."""

    def __init__(self, rate: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._start = clock()
        self._sent = 0

    def delay_for(self, size: int) -> float:
        """Seconds to wait before passing `size` more bytes (pure in the clock)."""
        if self.rate is None:
            return 0.0
        self._sent += size
        due = self._start + self._sent / self.rate
        return max(0.0, due - self._clock())

    def throttle(self, size: int) -> None:
        delay = self.delay_for(size)
        if delay > 0:
            time.sleep(delay)


def _hash_existing(path: Path) -> tuple[hashlib._Hash, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while piece := fh.read(1 << 20):
            digest.update(piece)
            size += len(piece)
    return digest, size


def download_blob(
    transport: Transport,
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    headers: Mapping[str, str],
    timeout: float = 30.0,
    rate_limit: int | None = None,
    progress: Progress | None = None,
    limiter: RateLimiter | None = None,
    seal: Callable[[bytes], bytes] | None = None,
    part: Path | None = None,
) -> DownloadResult:
    """Download the blob at `url` to `dest`, resuming its part file (`part`, by default `dest.part`) if an earlier
    attempt left one; with `seal`, `dest` holds `seal(bytes)` once they verify.

    Raises:
        TransportError: the server could not be reached or the connection broke (the part file stays, so
            the next attempt resumes).
        VerificationError: the bytes do not hash to `sha256` or exceed `size` (the part file is deleted).
        AuthError, Forbidden, ServerError: the server refused (see `raise_for_status`).
        VaultUnavailable: from `seal` (the part file stays).
    """
    part = part if part is not None else dest.with_name(dest.name + ".part")
    if dest.exists():
        part.unlink(missing_ok=True)  # a kill after `dest` was sealed and before the part file went
        return DownloadResult(path=dest, resumed_from=size, received=0)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest, have = _hash_existing(part) if part.exists() else (hashlib.sha256(), 0)
    if have > size:
        part.unlink()
        digest, have = hashlib.sha256(), 0
    resumed_from = have
    received = 0
    limiter = limiter or RateLimiter(rate_limit)
    if have < size:
        request_headers = dict(headers)
        if have:
            request_headers["range"] = f"bytes={have}-"
        with transport.stream("GET", url, headers=request_headers, timeout=timeout) as response:
            if response.status == 416:
                part.unlink(missing_ok=True)
                raise TransportError(f"server refused the range {have}- of blob {sha256}; starting over next time")
            if response.status not in (200, 206):
                raise_for_status(HttpResponse(response.status, response.headers, response.read(4096)), "download")
                raise TransportError(f"download: unexpected HTTP {response.status}")
            if response.status == 200 and have:
                digest, have, resumed_from = hashlib.sha256(), 0, 0  # the server ignored the range: start over
            mode = "ab" if have else "wb"
            # Unbuffered: each piece is in the file (page cache) as soon as it is read, so a kill -9 loses
            # nothing that arrived. Rate-limited downloads read in pieces of about a tenth of a second.
            rate = limiter.rate
            piece_size = _PIECE if rate is None else max(1024, min(_PIECE, rate // 10))
            with part.open(mode, buffering=0) as out:
                try:
                    while have < size:
                        piece = response.read(min(piece_size, size - have))
                        if not piece:
                            break
                        view = memoryview(piece)
                        while view:  # a raw file may take fewer bytes than offered
                            view = view[out.write(view) or 0 :]
                        digest.update(piece)
                        have += len(piece)
                        received += len(piece)
                        if progress is not None:
                            progress(have, size)
                        limiter.throttle(len(piece))
                finally:
                    os.fsync(out.fileno())
                extra = response.read(1)
            if extra:
                part.unlink(missing_ok=True)
                raise VerificationError(f"blob {sha256} is longer than the {size} bytes promised")
    if have < size:
        raise TransportError(f"download of blob {sha256} stopped at {have} of {size} bytes; will resume")
    if digest.hexdigest() != sha256:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        earlier = f" (its first {resumed_from} bytes from an earlier, interrupted attempt)" if resumed_from else ""
        raise VerificationError(
            f"downloaded blob hashes to {digest.hexdigest()}, expected {sha256}{earlier}; discarded, the next attempt "
            "starts over"
        )
    if seal is None:
        os.replace(part, dest)
        fsync_dir(dest.parent)
    else:
        write_bytes_atomic(dest, seal(part.read_bytes()))
        part.unlink()
    return DownloadResult(path=dest, resumed_from=resumed_from, received=received)
