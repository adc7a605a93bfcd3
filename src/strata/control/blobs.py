"""Content-addressed blob storage: a `BlobStore` interface and the file implementation under `blobs/sha256/`.

A blob is named by the hex sha256 of its bytes. Writing happens in two steps so that a caller can check what it
received before anyone can see it: `stage` streams into a temporary file while hashing and counting, `commit`
makes the staged file visible under its hash. `put` does both. An S3-compatible store can implement the same
interface, staging locally.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from strata.control.errors import PayloadTooLarge, StoreError, disk_error
from strata.core.errors import NotFound
from strata.core.fsutil import fsync_dir
from strata.core.hashing import is_hex_sha256


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its hex sha256 and size in bytes."""

    sha256: str
    size: int


class StagedBlob:
    """Bytes received into a temporary file, hashed as they were written; not yet visible in the store.

    Use it as a context manager: leaving the block removes the file unless it was committed.
    """

    def __init__(self, path: Path, sha256: str, size: int) -> None:
        self.path = path
        self.sha256 = sha256
        self.size = size

    def discard(self) -> None:
        """Remove the temporary file if it is still there."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> StagedBlob:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.discard()


class BlobStore(Protocol):
    """Where package tars live, addressed by their sha256."""

    def stage(self, chunks: Iterable[bytes], limit: int | None = None) -> StagedBlob:
        """Write `chunks` to a temporary file while hashing them.

        Raises:
            PayloadTooLarge: more than `limit` bytes arrived (the partial file is removed).
            StoreError: the temporary file cannot be written.
        """
        ...

    def commit(self, staged: StagedBlob) -> BlobInfo:
        """Make a staged file visible under its sha256 (durably); a blob already there is kept.

        Raises:
            StoreError: the file cannot be moved into place.
        """
        ...

    def put(self, chunks: Iterable[bytes], limit: int | None = None) -> BlobInfo:
        """`stage` then `commit`.

        Raises:
            PayloadTooLarge, StoreError: as `stage` and `commit`.
        """
        ...

    def exists(self, sha256: str) -> bool:
        """True when a blob with this hex sha256 is stored."""
        ...

    def size(self, sha256: str) -> int:
        """Size in bytes of a stored blob.

        Raises:
            NotFound: no such blob.
        """
        ...

    def path(self, sha256: str) -> Path:
        """Local file of a stored blob, for serving it with ranges.

        Raises:
            NotFound: no such blob.
        """
        ...

    def open(self, sha256: str) -> BinaryIO:
        """The blob's bytes, for reading.

        Raises:
            NotFound: no such blob.
        """
        ...


class FileBlobStore:
    """Blobs as files `root/sha256/<hex[:2]>/<hex[2:4]>/<hex>`, staged in `tmp_dir` on the same file system."""

    def __init__(self, root: Path, tmp_dir: Path) -> None:
        self.root = root
        self.tmp_dir = tmp_dir

    def _location(self, sha256: str) -> Path:
        if not is_hex_sha256(sha256):
            raise NotFound(f"{sha256!r} is not a hex sha256")
        return self.root / "sha256" / sha256[:2] / sha256[2:4] / sha256

    def stage(self, chunks: Iterable[bytes], limit: int | None = None) -> StagedBlob:
        """See `BlobStore.stage`."""
        digest = hashlib.sha256()
        size = 0
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=".blob.", suffix=".tmp")
        except OSError as exc:
            raise disk_error(f"cannot create a temporary file in {self.tmp_dir}: {exc}", exc) from exc
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise PayloadTooLarge(f"the upload is larger than the {limit} bytes this server accepts")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise disk_error(f"cannot write a temporary file in {self.tmp_dir}: {exc}", exc) from exc
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return StagedBlob(path, digest.hexdigest(), size)

    def commit(self, staged: StagedBlob) -> BlobInfo:
        """See `BlobStore.commit`."""
        target = self._location(staged.sha256)
        try:
            if target.is_file():
                staged.discard()
            else:
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.chmod(staged.path, 0o600)  # packages are plaintext here: the server's user alone reads them
                os.replace(staged.path, target)
                fsync_dir(target.parent)
        except OSError as exc:
            raise disk_error(f"cannot store blob {staged.sha256}: {exc}", exc) from exc
        return BlobInfo(staged.sha256, staged.size)

    def put(self, chunks: Iterable[bytes], limit: int | None = None) -> BlobInfo:
        """See `BlobStore.put`."""
        with self.stage(chunks, limit) as staged:
            return self.commit(staged)

    def exists(self, sha256: str) -> bool:
        """See `BlobStore.exists`."""
        return is_hex_sha256(sha256) and self._location(sha256).is_file()

    def size(self, sha256: str) -> int:
        """See `BlobStore.size`."""
        return self._stat(sha256).st_size

    def path(self, sha256: str) -> Path:
        """See `BlobStore.path`."""
        self._stat(sha256)
        return self._location(sha256)

    def open(self, sha256: str) -> BinaryIO:
        """See `BlobStore.open`."""
        try:
            return self._location(sha256).open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} is not stored") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {sha256}: {exc}") from exc

    def _stat(self, sha256: str) -> os.stat_result:
        try:
            return self._location(sha256).stat()
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} is not stored") from None
        except OSError as exc:
            raise StoreError(f"cannot read blob {sha256}: {exc}") from exc
