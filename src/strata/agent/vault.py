"""The agent's handle on encryption at rest (see strata.trust.vault for the format and the worker's protocol).

The agent never loads `cryptography`: a `Vault` starts the worker child process on first use, keeps it while
there is work (downloads, assembly, activation, relay requests), and stops it after `idle_s` without a call
(`close_if_idle`, from the agent's loop). A decryption that fails is a `VerificationError` (the bytes were
changed, moved or sealed with another key); a worker that cannot start or dies is a `VaultUnavailable`.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

from strata.core.errors import StrataError, VerificationError

MAGIC: Final = b"SENC1"  # strata.trust.vault.MAGIC, without importing cryptography here
OVERHEAD: Final = len(MAGIC) + 12 + 16  # strata.trust.vault.OVERHEAD: sealed bytes are this much longer (nonce, tag)


class VaultUnavailable(StrataError):
    """The vault worker could not start or stopped answering (no node key yet, a broken install)."""

    code = "vault_unavailable"
    http_status = 503


def file_aad(digest: str, path: str) -> bytes:
    """Associated data of a package file: sealed bytes belong to this package and this path only."""
    return b"file\0" + digest.encode() + b"\0" + path.encode()


def piece_aad(sha256: str) -> bytes:
    """Associated data of a downloaded or cached piece."""
    return b"piece\0" + sha256.encode()


def is_sealed(data: bytes) -> bool:
    return data.startswith(MAGIC)


class Vault:
    """Seals and opens bytes with this node's data key, through a worker child process (thread-safe)."""

    def __init__(self, trust_dir: Path, *, idle_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.trust_dir = trust_dir
        self.idle_s = idle_s
        self.clock = clock
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._last = 0.0

    def seal(self, aad: bytes, data: bytes) -> bytes:
        """Raises:
        VaultUnavailable: the worker is not running and cannot start.
        """
        return self._call(b"E", aad, data)

    def open(self, aad: bytes, sealed: bytes) -> bytes:
        """Raises:
        VerificationError: the bytes are not sealed, or do not decrypt with this key for this name.
        VaultUnavailable: the worker is not running and cannot start.
        """
        return self._call(b"D", aad, sealed)

    def _call(self, op: bytes, aad: bytes, data: bytes) -> bytes:
        with self._lock:
            proc = self._worker()
            assert proc.stdin is not None
            assert proc.stdout is not None
            try:
                proc.stdin.write(op + struct.pack(">I", len(aad)) + aad + struct.pack(">Q", len(data)))
                proc.stdin.write(data)
                proc.stdin.flush()
                head = _read_exact(proc.stdout, 9)
                status, size = struct.unpack(">BQ", head)
                out = _read_exact(proc.stdout, size)
            except (OSError, ValueError, struct.error) as exc:
                self._stop()
                raise VaultUnavailable(f"the vault worker stopped answering: {exc}") from exc
            self._last = self.clock()
        if status != 0:
            raise VerificationError(out.decode(errors="replace"))
        return out

    def _worker(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        try:
            proc = subprocess.Popen(
                [sys.executable, "-OO", "-m", "strata.trust.vault", "serve", str(self.trust_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise VaultUnavailable(f"cannot start the vault worker: {exc}") from exc
        assert proc.stdout is not None
        assert proc.stderr is not None
        try:
            ready = _read_exact(proc.stdout, 1)
        except ValueError:
            ready = b""
        if ready != b"R":
            proc.kill()
            proc.wait()
            message = proc.stderr.read().decode(errors="replace").strip()
            raise VaultUnavailable(f"the vault worker did not start: {message or 'no answer'}")
        self._proc = proc
        return proc

    def close_if_idle(self) -> None:
        """Stop the worker when it has not been used for `idle_s` (never waits for a call in progress)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self._proc is not None and self.clock() - self._last >= self.idle_s:
                self._stop()
        finally:
            self._lock.release()

    def close(self) -> None:
        with self._lock:
            self._stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = stream.read(size - len(data))
        if not piece:
            raise ValueError("the vault worker closed its output")
        data += piece
    return bytes(data)
