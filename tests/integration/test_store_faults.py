"""The artifact store under local faults: a full disk, and a kill -9 at any instant.

A local I/O problem is the node's, not the package's: it must not be counted against a version (rollout gates
read those failures), and it must not cost what the node already verified (the active package, a download).
ENOSPC is simulated by replacing the store's atomic write; a kill by a BaseException no handler catches, after
which a new store opens the same folder as the next agent would.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import shutil
from pathlib import Path

import pytest
from test_agent_safety import make_node, package
from test_vault import BLOB, deliver

import strata.agent.store as store_module
from strata.agent.plan import Activate, Download, Stage, plan
from strata.agent.store import ArtifactStore
from strata.agent.vault import Vault, file_aad
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json
from strata.core.package import Package
from strata.package_build import build_package


def disk_full(path: Path, data: bytes, mode: int = 0o644) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def staging_full(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Full once assembly starts writing (what was written before, the kept manifest, went through)."""
    if any(part.startswith(".staging-") for part in path.parts):
        disk_full(path, data, mode)
    write_bytes_atomic(path, data, mode)


@pytest.mark.parametrize("full", [disk_full, staging_full], ids=["every-write", "staging-writes"])
def test_a_full_disk_while_assembling_is_no_failure_of_the_package_and_keeps_the_download(
    full: object, digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = make_node(tmp_path, {})
    node.offer(*package(digits_onnx, "1", tmp_path / "a", name="digits"))
    v2 = node.offer(*package(digits_onnx_v2, "2", tmp_path / "b", name="digits"))
    r = node.reconciler
    r.converge(node.want("1", name="digits"))
    want = node.want("2", name="digits")
    [download] = plan(want, r.observe(), node.clock.now)
    assert isinstance(download, Download)
    r.execute(download)
    pieces = sorted(p.name for p in r.store.pieces_dir.iterdir())
    [stage] = plan(want, r.observe(), node.clock.now)
    assert isinstance(stage, Stage)

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_bytes_atomic", full)
        with pytest.raises(OSError, match="No space left"):  # the agent's loop logs it and tries again later
            r.execute(stage)
    assert v2.digest not in r.state.failures  # not the package's failure: no rollout gate counts it
    assert sorted(p.name for p in r.store.pieces_dir.iterdir()) == pieces
    assert r.store.downloaded_blobs() == {v2.blob}
    assert r.store.manifest_path(v2.digest).exists()
    assert not any(p.name.startswith(".staging-") for p in r.store.packages.iterdir())

    # Space again: the next try assembles from what was kept, fetching nothing.
    [again] = plan(want, r.observe(), node.clock.now)
    assert again == stage
    r.execute(again)
    assert v2.digest in r.store.staged_digests()
    assert isinstance(plan(want, r.observe(), node.clock.now)[0], Activate)


def test_a_kept_manifest_is_read_without_being_written_again(
    digits_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    store = ArtifactStore(tmp_path / "node")
    store.save_manifest(built.digest, canonical_json(built.manifest.to_json()))
    path = store.manifest_path(built.digest)
    before = path.stat()

    monkeypatch.setattr(store_module, "write_bytes_atomic", disk_full)
    loaded = store.load_manifest(built.digest)
    assert loaded is not None
    assert loaded.digest == built.digest
    assert path.stat().st_ino == before.st_ino  # read, not replaced

    monkeypatch.setattr(store_module, "write_bytes_atomic", write_bytes_atomic)
    path.write_bytes(path.read_bytes() + b" ")  # a bad one is still removed, to be fetched again
    assert store.load_manifest(built.digest) is None
    assert not path.exists()
    assert store.load_manifest(built.digest) is None


# --- sealing, at the start of an agent with encryption at rest, what an earlier run kept in the clear ---------------


class Killed(BaseException):
    """A kill -9 at this instant: no `except OSError` or `except Exception` stops it."""


@pytest.fixture
def in_the_clear(digits_onnx: Path, tmp_path: Path) -> Package:
    """A package staged by an agent run with --no-encrypt-at-rest (its files in the clear)."""
    built = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    store = ArtifactStore(tmp_path / "node")
    deliver(store, built)
    store.assemble(BLOB, built.digest)
    assert len(built.manifest.files) > 1
    return built


def on_disk(store: ArtifactStore, package: Package) -> dict[str, bytes]:
    return {
        entry.path: (store.package_dir(package.digest) / entry.path).read_bytes() for entry in package.manifest.files
    }


def plaintext(package: Package) -> dict[str, bytes]:
    return {entry.path: (package.path / entry.path).read_bytes() for entry in package.manifest.files}


def assert_opens(store: ArtifactStore, package: Package) -> None:
    _, files = store.open(package.digest)
    assert files == plaintext(package)


def test_a_full_disk_while_sealing_keeps_the_package_in_the_clear_until_a_later_start(
    in_the_clear: Package,
    vault: Vault,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = ArtifactStore(tmp_path / "node", vault)
    writes: list[Path] = []

    def full_after_one(path: Path, data: bytes, mode: int = 0o644) -> None:
        writes.append(path)
        if len(writes) > 1:
            disk_full(path, data, mode)
        write_bytes_atomic(path, data, mode)

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger="strata.agent"):
        patch.setattr(store_module, "write_bytes_atomic", full_after_one)
        assert store.seal_plaintext_packages() == []
    assert "stays in the clear" in caplog.text
    assert store.staged_digests() == {in_the_clear.digest}  # the active package of a node is not lost to a full disk
    assert on_disk(store, in_the_clear) == plaintext(in_the_clear)  # whole, untouched
    assert [p.name for p in store.packages.iterdir()] == [store.package_dir(in_the_clear.digest).name]
    assert_opens(store, in_the_clear)  # and served meanwhile
    # Its pieces still serve the next version's assembly and the relay (they were read as sealed, and refused).
    held = store.piece_index()
    assert held
    for sha, piece in held.items():
        assert hashlib.sha256(store.read_held(piece)).hexdigest() == sha

    later = ArtifactStore(tmp_path / "node", vault)  # the next start, with room
    later.clean_interrupted()
    assert later.seal_plaintext_packages() == [in_the_clear.digest]
    assert all(data.startswith(b"SENC1") for data in on_disk(later, in_the_clear).values())
    assert_opens(later, in_the_clear)


@pytest.mark.parametrize("instant", ["first-file", "between-files", "between-renames", "after-the-swap"])
def test_a_kill_at_any_instant_of_sealing_leaves_a_package_the_next_start_opens(
    instant: str, in_the_clear: Package, vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ArtifactStore(tmp_path / "node", vault)
    writes: list[Path] = []
    rename, rmtree = Path.rename, shutil.rmtree

    def killed_at_write(path: Path, data: bytes, mode: int = 0o644) -> None:
        writes.append(path)
        if len(writes) == {"first-file": 2, "between-files": 3}.get(instant):
            raise Killed
        write_bytes_atomic(path, data, mode)

    def killed_at_rename(self: Path, target: Path) -> Path:
        if instant == "between-renames" and self.parent.name.startswith(".staging-"):
            raise Killed  # the package is set aside, its sealed copy not yet in its place
        return rename(self, target)

    def killed_at_rmtree(path: Path, *args: object, **kwargs: object) -> None:
        if instant == "after-the-swap" and Path(path).name.startswith(".unsealed-") and Path(path).exists():
            raise Killed  # the sealed copy is in place, the one in the clear not yet removed
        rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_bytes_atomic", killed_at_write)
        patch.setattr(Path, "rename", killed_at_rename)
        patch.setattr(shutil, "rmtree", killed_at_rmtree)
        with pytest.raises(Killed):
            store.seal_plaintext_packages()

    after = ArtifactStore(tmp_path / "node", vault)  # the next start, as `strata agent` runs it
    after.clean_interrupted()
    assert after.seal_plaintext_packages() == ([] if instant == "after-the-swap" else [in_the_clear.digest])
    assert all(data.startswith(b"SENC1") for data in on_disk(after, in_the_clear).values())
    assert_opens(after, in_the_clear)
    assert [p.name for p in after.packages.iterdir()] == [after.package_dir(in_the_clear.digest).name]


def test_a_package_an_older_agent_left_half_sealed_is_sealed_whole(
    in_the_clear: Package, vault: Vault, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "node", vault)
    first = in_the_clear.manifest.files[0]
    path = store.package_dir(in_the_clear.digest) / first.path
    # what an agent that sealed in place, file by file, left when killed after its first file
    path.write_bytes(vault.seal(file_aad(in_the_clear.digest, first.path), path.read_bytes()))
    assert store.seal_plaintext_packages() == [in_the_clear.digest]
    assert all(data.startswith(b"SENC1") for data in on_disk(store, in_the_clear).values())
    assert_opens(store, in_the_clear)


def test_a_package_kept_in_the_clear_that_does_not_verify_is_removed(
    in_the_clear: Package, vault: Vault, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "node", vault)
    model = store.package_dir(in_the_clear.digest) / in_the_clear.manifest.model_file
    changed = bytearray(model.read_bytes())
    changed[len(changed) // 2] ^= 1
    model.write_bytes(bytes(changed))
    assert store.seal_plaintext_packages() == []
    assert store.staged_digests() == frozenset()
