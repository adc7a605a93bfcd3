"""The artifact store under local faults: a full disk, and a kill -9 at any instant.

A local I/O problem is the node's, not the package's: it must not be counted against a version (rollout gates
read those failures), and it must not cost what the node already verified (the active package, a download).
ENOSPC is simulated by replacing the store's atomic write; a kill by a BaseException no handler catches.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from test_agent_safety import make_node, package

import strata.agent.store as store_module
from strata.agent.plan import Activate, Download, Stage, plan
from strata.agent.store import ArtifactStore
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json
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
