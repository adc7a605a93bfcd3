"""The node's artifact store: downloaded blobs, verified packages, and the slots state file.

Layout under the data folder:
    downloads/<digest-hex>.manifest           a package's manifest, fetched first and verified by its digest
    downloads/pieces/<sha256>[.part]          chunks and small files this node did not hold (resumable)
    downloads/<blob>.ready                    every piece of that package is here (the plan's "downloaded")
    packages/<digest-hex>/                    verified packages (immutable once renamed in)
    packages/.staging-*                       assembly or sealing in progress (removed at start-up)
    packages/.unsealed-<digest-hex>/          a package in the clear set aside while its sealed copy is renamed
                                              in (put back at start-up if a kill came between the two renames)
    state.json                                slots (active, previous) per model, and remembered failures

With a vault (encryption at rest, the default on an enrolled node), package files and downloaded pieces are
stored sealed with the node's data key (AES-256-GCM, see strata.agent.vault): a package is decrypted only in
memory, and its files are checked against the manifest's hashes after decryption. Manifests stay in the clear
(names and hashes, not the model). Only the one piece being downloaded is ever plaintext on disk (its `.part`):
a piece reaches its final name sealed and whole, or not at all, and one of the wrong length there (left by an
earlier agent, or by encryption at rest being switched) is fetched again. A package kept in the clear by an earlier
run is sealed at start-up into a staging copy that then replaces it whole (`seal_plaintext_packages`); on a full
disk it stays in the clear, and is opened so, until a later start seals it.

A package is rebuilt from pieces: chunks of large files and small files whole, each named by its sha256. A
piece already present in a staged package (the previous version, say) is copied from there, so a new version
costs only the chunks it changed.

Activation is one atomic replace of state.json: a kill -9 at any instant leaves the old or the new slots.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from strata.agent.state import NodeState
from strata.agent.vault import MAGIC, OVERHEAD, Vault, file_aad, is_sealed, piece_aad
from strata.core.chunking import Chunk, offsets
from strata.core.errors import PackageError, VerificationError
from strata.core.fsutil import fsync_dir, remove_stale_temporaries, write_bytes_atomic, write_json_atomic
from strata.core.package import (
    MANIFEST_NAME,
    Manifest,
    Package,
    check_model_references,
    parse_manifest,
    read_manifest,
    safe_relative_path,
    verify_package,
)
from strata.core.wire import ProtocolError

log = logging.getLogger("strata.agent")

PackageCheck = Callable[[Path, Mapping[str, str] | None], None]
"""A check of an assembled package before it is staged: given its folder and, when the files on disk are sealed,
the sha256 of each file's plaintext by path (None when the folder holds the plaintext). Raises to refuse."""


def _check_manifest(digest: str, data: bytes) -> Manifest:
    """The manifest `data` holds, once it is checked to be the one `digest` names.

    Raises:
        VerificationError: the bytes do not hash to the digest, or do not parse to a manifest with it.
    """
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise VerificationError(f"manifest does not hash to {digest}")
    try:
        manifest = parse_manifest(data)
    except PackageError as exc:
        raise VerificationError(f"manifest of {digest} does not parse: {exc}") from exc
    if manifest.digest != digest:
        raise VerificationError(f"manifest names digest {manifest.digest}, expected {digest}")
    return manifest


def digest_hex(digest: str) -> str:
    """`sha256:<hex>` -> `<hex>` (package folder names)."""
    return digest.split(":", 1)[1] if ":" in digest else digest


class Held(NamedTuple):
    """Where a piece lives inside a staged package: its file, and the piece's offset and size in the plaintext."""

    digest: str
    entry: str
    path: Path
    offset: int
    size: int


class ArtifactStore:
    """Files of the node's packages and slots (see the module docstring for the layout)."""

    def __init__(self, data_dir: Path, vault: Vault | None = None) -> None:
        self.root = data_dir
        self.vault = vault
        self.downloads = data_dir / "downloads"
        self.packages = data_dir / "packages"
        self.state_path = data_dir / "state.json"
        self._held: dict[str, tuple[tuple[str, Held], ...]] = {}  # a staged package's pieces, by folder name
        self._held_lock = threading.Lock()
        # packages that a full disk (or another local I/O error) kept in the clear at start-up: `open` takes their
        # files unsealed, checked against the manifest as sealed ones are, until a later start seals them
        self._in_clear: set[str] = set()
        for folder in (self.downloads, self.packages):
            folder.mkdir(parents=True, exist_ok=True)

    # --- state ------------------------------------------------------------------------------------------

    def load_state(self) -> NodeState:
        """The stored slots; an unreadable state file is kept aside and an empty state returned."""
        try:
            raw = json.loads(self.state_path.read_text())
            return NodeState.from_json(raw)
        except FileNotFoundError:
            return NodeState()
        except (OSError, ValueError, KeyError, TypeError, ProtocolError):
            # os.replace makes a torn write impossible; this is damage from outside. Keep it for a person.
            with contextlib.suppress(OSError):
                self.state_path.rename(self.state_path.with_suffix(".corrupt"))
            return NodeState()

    def save_state(self, state: NodeState) -> None:
        """Replace state.json atomically: the commit point of every activation."""
        write_json_atomic(self.state_path, state.to_json())

    # --- downloads ---------------------------------------------------------------------------------------

    @property
    def pieces_dir(self) -> Path:
        return self.downloads / "pieces"

    def piece_path(self, sha256: str) -> Path:
        return self.pieces_dir / sha256

    def manifest_path(self, digest: str) -> Path:
        return self.downloads / f"{digest_hex(digest)}.manifest"

    def downloaded_blobs(self) -> frozenset[str]:
        """Packages (by blob id) whose pieces are all on this node, ready to assemble."""
        return frozenset(p.name.removesuffix(".ready") for p in self.downloads.glob("*.ready"))

    def mark_downloaded(self, blob: str) -> None:
        write_bytes_atomic(self.downloads / f"{blob}.ready", b"")

    def save_manifest(self, digest: str, data: bytes) -> Manifest:
        """Keep a fetched manifest after checking it is the one `digest` names.

        Raises:
            VerificationError: the bytes do not hash to the digest, or do not parse to a manifest with it.
        """
        manifest = _check_manifest(digest, data)
        write_bytes_atomic(self.manifest_path(digest), data)
        return manifest

    def load_manifest(self, digest: str) -> Manifest | None:
        """The manifest kept for `digest`, verified again (read only: the file is not written again, so a full disk
        cannot cost a good manifest); None when absent, or bad (the file is removed, to be fetched again).

        Raises:
            OSError: the file is there but cannot be read (a local I/O problem: it is kept, for a later try).
        """
        path = self.manifest_path(digest)
        try:
            return _check_manifest(digest, path.read_bytes())
        except FileNotFoundError:
            return None
        except VerificationError:
            path.unlink(missing_ok=True)
            return None

    def piece_index(self) -> dict[str, Held]:
        """Every piece this node holds in its staged packages, by sha256.

        A staged package never changes (its folder is named by its digest), so each one's pieces are read once and
        remembered: the relay asks for this index on every piece it serves."""
        index: dict[str, Held] = {}
        present = set()
        for folder in self.packages.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            present.add(folder.name)
            with self._held_lock:
                held = self._held.get(folder.name)
            if held is None:
                held = self._read_held(folder)
                if held is None:
                    continue
                with self._held_lock:
                    self._held[folder.name] = held
            for sha, piece in held:
                index.setdefault(sha, piece)
        with self._held_lock:
            for gone in self._held.keys() - present:
                del self._held[gone]
        return index

    @staticmethod
    def _read_held(folder: Path) -> tuple[tuple[str, Held], ...] | None:
        try:
            manifest = read_manifest(folder)
        except PackageError:
            return None
        digest = "sha256:" + folder.name
        pieces: list[tuple[str, Held]] = []
        for entry in manifest.files:
            path = folder / entry.path
            if not entry.chunks:
                pieces.append((entry.sha256, Held(digest, entry.path, path, 0, entry.size)))
            for offset, chunk in offsets(entry.chunks):
                pieces.append((chunk.sha256, Held(digest, entry.path, path, offset, chunk.size)))
        return tuple(pieces)

    def write_piece(self, sha256: str, data: bytes) -> None:
        """Keep a downloaded piece (sealed when this store has a vault)."""
        write_bytes_atomic(self.piece_path(sha256), self.vault.seal(piece_aad(sha256), data) if self.vault else data)

    def piece_seal(self, sha256: str) -> Callable[[bytes], bytes] | None:
        """How a download of piece `sha256` is kept: sealed for it with this store's vault (None without one).

        The callable raises VaultUnavailable when the vault worker cannot start."""
        vault = self.vault
        if vault is None:
            return None
        aad = piece_aad(sha256)
        return lambda data: vault.seal(aad, data)

    def has_piece(self, sha256: str, size: int) -> bool:
        """Whether downloaded piece `sha256` (`size` bytes in the clear) is here, whole and kept as this store keeps
        pieces (sealed with a vault). A piece file of any other length is removed, so the piece is fetched again:
        one in the clear where pieces are sealed (an earlier agent was killed between writing and sealing it), or
        sealed where they are not."""
        path = self.piece_path(sha256)
        try:
            stored = path.stat().st_size
        except FileNotFoundError:
            return False
        expected = size + (OVERHEAD if self.vault is not None else 0)
        if stored == expected:
            return True
        log.info(
            "piece %s on disk is %d bytes, not the %d it is kept as: fetching it again", sha256[:12], stored, expected
        )
        path.unlink(missing_ok=True)
        return False

    def read_piece(self, sha256: str) -> bytes | None:
        """A downloaded piece, opened and checked against its name; None when it is not here.

        Raises:
            VerificationError: it does not open or does not hash to its name (the file is removed).
        """
        path = self.piece_path(sha256)
        try:
            data = path.read_bytes()
            if self.vault is not None:
                data = self.vault.open(piece_aad(sha256), data)
        except FileNotFoundError:
            return None
        except (OSError, VerificationError) as exc:
            path.unlink(missing_ok=True)
            raise VerificationError(f"piece {sha256} is unreadable: {exc}") from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            path.unlink(missing_ok=True)
            raise VerificationError(f"piece {sha256} does not hash to its name")
        return data

    def read_held(self, held: Held, opened: dict[Path, bytes] | None = None) -> bytes:
        """The bytes of a piece held in a staged package (decrypting its file when sealed, or reading it as it is in
        a package kept in the clear; `opened` caches whole decrypted files between calls; the caller checks the
        piece's hash).

        Raises:
            OSError: the file is gone.
            VerificationError: a sealed file does not open.
        """
        if self.vault is None:
            with held.path.open("rb") as fh:
                fh.seek(held.offset)
                return fh.read(held.size)
        plain = opened.get(held.path) if opened is not None else None
        if plain is None:
            plain = held.path.read_bytes()
            # A package a full disk kept in the clear (`_in_clear`) holds its files unsealed until a later start
            # seals it; the caller checks the piece's hash either way.
            if held.digest not in self._in_clear or is_sealed(plain):
                plain = self.vault.open(file_aad(held.digest, held.entry), plain)
            if opened is not None:
                opened[held.path] = plain
        return plain[held.offset : held.offset + held.size]

    # --- packages ---------------------------------------------------------------------------------------

    def package_dir(self, digest: str) -> Path:
        return self.packages / digest_hex(digest)

    def staged_digests(self) -> frozenset[str]:
        return frozenset(
            "sha256:" + p.name for p in self.packages.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def assemble(self, blob: str, digest: str, check: PackageCheck | None = None) -> Package:
        """Rebuild package `digest` from its manifest and pieces (downloaded or held locally), verify it whole,
        run `check` on it (the release signature: over the folder, or with a vault over the sha256 of each file's
        plaintext, computed in memory), and move it into packages/ (sealed, with a vault). The downloaded pieces,
        manifest and ready-mark are removed afterwards.

        Raises:
            PackageError, VerificationError: a piece is missing, the result does not verify, or `check` refused
                it (what was downloaded for it is discarded, so the next attempt fetches it again).
            OSError: a local I/O problem, the disk full say: no fault of the package, so it is not counted against
                it; the staging copy is removed and the verified manifest and pieces are kept for the next try.
            VaultUnavailable: the vault worker cannot start (nothing is discarded).
        """
        target = self.package_dir(digest)
        if target.is_dir():
            return self.open(digest)[0]
        manifest = self.load_manifest(digest)
        if manifest is None:
            self._forget_download(blob, digest, [])
            raise PackageError(f"the manifest of {digest} is not on this node")
        local = self.piece_index()
        opened: dict[Path, bytes] = {}
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.packages))
        folder = staging / "p"
        used: list[str] = []
        hashes: dict[str, str] = {}
        try:
            folder.mkdir()
            write_bytes_atomic(folder / MANIFEST_NAME, self.manifest_path(digest).read_bytes())
            for entry in manifest.files:
                out_path = folder / safe_relative_path(entry.path)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                pieces = entry.chunks or (Chunk(entry.sha256, entry.size),)
                if self.vault is None:
                    with out_path.open("wb") as out:
                        for piece in pieces:
                            out.write(self._read_piece(piece, local, opened))
                            used.append(piece.sha256)
                        out.flush()
                        os.fsync(out.fileno())
                    continue
                data = b"".join(self._read_piece(piece, local, opened) for piece in pieces)
                used.extend(piece.sha256 for piece in pieces)
                plain_sha256 = hashlib.sha256(data).hexdigest()
                if len(data) != entry.size or plain_sha256 != entry.sha256:
                    raise VerificationError(f"package file {entry.path} does not match its manifest")
                hashes[entry.path] = plain_sha256
                if entry.path == manifest.model_file:
                    check_model_references(manifest, data)  # what verify_package checks in the clear
                write_bytes_atomic(out_path, self.vault.seal(file_aad(digest, entry.path), data))
            package = verify_package(folder, digest) if self.vault is None else Package(folder, manifest)
            if check is not None:
                check(folder, None if self.vault is None else hashes)
        except PackageError:
            shutil.rmtree(staging, ignore_errors=True)
            self._forget_download(blob, digest, used)
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        folder.rename(target)
        fsync_dir(self.packages)
        shutil.rmtree(staging, ignore_errors=True)
        self._forget_download(blob, digest, used)
        return Package(path=target, manifest=package.manifest)

    def _read_piece(self, piece: Chunk, local: dict[str, Held], opened: dict[Path, bytes]) -> bytes:
        data = self.read_piece(piece.sha256)
        if data is not None:
            return data
        held = local.get(piece.sha256)
        if held is None:
            raise PackageError(f"piece {piece.sha256} is neither downloaded nor held in a package")
        data = self.read_held(held, opened)
        if hashlib.sha256(data).hexdigest() != piece.sha256:
            raise VerificationError(f"piece {piece.sha256} held in {held.digest} does not hash to its name")
        return data

    def _forget_download(self, blob: str, digest: str, pieces: list[str]) -> None:
        for sha in pieces:
            self.piece_path(sha).unlink(missing_ok=True)
        (self.downloads / f"{blob}.ready").unlink(missing_ok=True)
        self.manifest_path(digest).unlink(missing_ok=True)

    def open(self, digest: str) -> tuple[Package, dict[str, bytes] | None]:
        """A staged package, verified again before it is trusted, and (with a vault) every file decrypted in
        memory and checked against the manifest; without a vault the files are hashed on disk and None is
        returned for them.

        Raises:
            PackageError, VerificationError: missing, changed on disk, or sealed with another key.
            VaultUnavailable: the vault worker cannot start.
        """
        folder = self.package_dir(digest)
        if not folder.is_dir():
            raise PackageError(f"package {digest} is not on this node")
        if self.vault is None:
            return verify_package(folder, digest), None
        manifest = read_manifest(folder)
        if manifest.digest != digest:
            raise VerificationError(f"package digest is {manifest.digest}, expected {digest}: the manifest was changed")
        in_clear = digest in self._in_clear
        files: dict[str, bytes] = {}
        for entry in manifest.files:
            path = folder / safe_relative_path(entry.path)
            if path.is_symlink() or not path.is_file():
                raise VerificationError(f"package file {entry.path} is missing or not a regular file")
            try:
                data = path.read_bytes()
                if not in_clear or is_sealed(data):
                    data = self.vault.open(file_aad(digest, entry.path), data)
            except OSError as exc:
                raise VerificationError(f"cannot read package file {entry.path}: {exc}") from exc
            except VerificationError as exc:
                raise VerificationError(f"package file {entry.path} does not open: {exc}") from exc
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                raise VerificationError(f"package file {entry.path} does not match its manifest after decryption")
            files[entry.path] = data
        return Package(path=folder, manifest=manifest), files

    def seal_plaintext_packages(self) -> list[str]:
        """With a vault, seal the staged packages an earlier run kept in the clear. Returns the digests sealed.

        Each package is sealed whole into a staging copy that then replaces it (`_seal_package`): a kill -9 at any
        instant leaves it whole in the clear or whole sealed, never a mix that opens neither way. A package with
        any file in the clear is sealed, so one that an older agent left half-sealed (it sealed in place, file by
        file, and looked only at the first) is made whole. Only a package that does not verify is removed: one
        that cannot be sealed for a local I/O error (a full disk) stays in the clear, with a warning, and `open`
        takes it as it is until a later start seals it; the active and previous versions are not lost to it.

        Run after `clean_interrupted`, which puts back a package a kill left set aside between the two renames.

        Raises:
            VaultUnavailable: the vault worker cannot start (the package being sealed is left as it was).
        """
        if self.vault is None:
            return []
        sealed = []
        for folder in sorted(self.packages.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            digest = "sha256:" + folder.name
            try:
                if not self._seal_package(self.vault, folder, digest):
                    continue
            except PackageError as exc:  # VerificationError too
                log.warning("package %s kept in the clear does not verify, removed: %s", digest[:19], exc)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            except OSError as exc:
                log.warning(
                    "cannot seal package %s kept in the clear (%s): it stays in the clear until a later start",
                    digest[:19],
                    exc,
                )
                self._in_clear.add(digest)
                continue
            self._in_clear.discard(digest)
            sealed.append(digest)
        return sealed

    def _seal_package(self, vault: Vault, folder: Path, digest: str) -> bool:
        """Seal the files of package `folder` that are in the clear; False when every one is sealed already.

        Every file is read, opened when sealed, and checked against the manifest in memory, then written sealed
        into a staging folder beside the packages (the manifest copied, nothing else), which is renamed in place
        of the package (`_swap_in`). Until that rename the package is untouched.

        Raises:
            PackageError, VerificationError: the package does not verify (a sealed file that does not open with
                this node's key among them).
            OSError: a local I/O problem (the staging copy is removed; the package is as it was).
        """
        manifest = read_manifest(folder)
        if manifest.digest != digest:
            raise VerificationError(f"package digest is {manifest.digest}, expected {digest}: the manifest was changed")
        paths = {entry.path: folder / safe_relative_path(entry.path) for entry in manifest.files}
        heads = {}
        for name, path in paths.items():
            if path.is_symlink() or not path.is_file():
                raise VerificationError(f"package file {name} is missing or not a regular file")
            with path.open("rb") as fh:
                heads[name] = is_sealed(fh.read(len(MAGIC)))
        if all(heads.values()):
            return False  # sealed (or no files): `open` checks it when it is used
        if not any(heads.values()):
            verify_package(folder, digest)  # all in the clear: checked as a package without a vault is
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.packages))
        try:
            staged = staging / "p"
            staged.mkdir()
            write_bytes_atomic(staged / MANIFEST_NAME, (folder / MANIFEST_NAME).read_bytes())
            for entry in manifest.files:
                data = paths[entry.path].read_bytes()
                aad, sealed = file_aad(digest, entry.path), is_sealed(data)
                plain = vault.open(aad, data) if sealed else data
                if len(plain) != entry.size or hashlib.sha256(plain).hexdigest() != entry.sha256:
                    raise VerificationError(f"package file {entry.path} does not match its manifest")
                if entry.path == manifest.model_file:
                    check_model_references(manifest, plain)
                out_path = staged / safe_relative_path(entry.path)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(out_path, data if sealed else vault.seal(aad, plain))
            self._swap_in(staged, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def _swap_in(self, staged: Path, folder: Path) -> None:
        """Put the complete folder `staged` in place of package `folder`.

        A folder cannot be renamed over one that is not empty, so the package is first renamed aside (to
        `.unsealed-<name>`, still whole) and `staged` renamed to its name; the aside copy is removed last. A kill
        between the two renames leaves no package under its name, but `_restore_set_aside` (at start-up, before
        anything reads the packages) puts the aside one back: the instant costs the sealing, never the package.
        """
        aside = self.packages / f".unsealed-{folder.name}"
        shutil.rmtree(aside, ignore_errors=True)  # a leftover from a kill after the swap, before its removal
        folder.rename(aside)
        try:
            staged.rename(folder)
        except OSError:
            aside.rename(folder)
            raise
        fsync_dir(self.packages)
        shutil.rmtree(aside, ignore_errors=True)

    def _restore_set_aside(self) -> None:
        """Finish what a kill inside `_swap_in` interrupted: a package set aside whose sealed copy never reached its
        name is put back (in the clear, to be sealed again); one whose sealed copy did is removed."""
        restored = False
        for aside in self.packages.glob(".unsealed-*"):
            folder = self.packages / aside.name.removeprefix(".unsealed-")
            if folder.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.rename(folder)
                restored = True
        if restored:
            fsync_dir(self.packages)

    def discard(self, digest: str) -> None:
        self._in_clear.discard(digest)
        shutil.rmtree(self.package_dir(digest), ignore_errors=True)

    def clean_interrupted(self) -> None:
        """Remove what a killed process left half-done: staging folders and temporary files.

        Only safe while holding the data-folder lock (no other process is staging here).
        """
        self._restore_set_aside()
        for entry in self.packages.iterdir():
            if entry.name.startswith(".staging-"):
                shutil.rmtree(entry, ignore_errors=True)
        remove_stale_temporaries(self.root)
        remove_stale_temporaries(self.packages)
        remove_stale_temporaries(self.pieces_dir)

    def collect_garbage(self, keep: frozenset[str], keep_blobs: frozenset[str]) -> list[str]:
        """Delete packages not in `keep`, downloads not in `keep_blobs`, and leftovers of interrupted work."""
        removed = []
        for entry in self.packages.iterdir():
            if entry.name.startswith(".staging-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and "sha256:" + entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append("sha256:" + entry.name)
        for entry in self.downloads.iterdir():
            abandoned = not keep_blobs  # nothing is being fetched: what is left belongs to abandoned downloads
            if abandoned and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            elif abandoned or (entry.suffix == ".ready" and entry.name.removesuffix(".ready") not in keep_blobs):
                entry.unlink(missing_ok=True)
        remove_stale_temporaries(self.root)
        return removed
