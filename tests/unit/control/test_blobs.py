"""The file blob store: content addresses, staging, limits, and nothing left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from strata.control.blobs import FileBlobStore
from strata.control.errors import PayloadTooLarge
from strata.core.errors import NotFound


@pytest.fixture
def store(tmp_path: Path) -> FileBlobStore:
    return FileBlobStore(tmp_path / "blobs", tmp_path / "tmp")


def test_put_stores_under_the_hash(store: FileBlobStore) -> None:
    data = b"hello " * 1000
    sha = hashlib.sha256(data).hexdigest()
    info = store.put([data[:100], data[100:]])
    assert (info.sha256, info.size) == (sha, len(data))
    assert store.path(sha) == store.root / "sha256" / sha[:2] / sha[2:4] / sha
    assert store.exists(sha)
    assert store.size(sha) == len(data)
    with store.open(sha) as fh:
        assert fh.read() == data
    assert list(store.tmp_dir.iterdir()) == []


def test_putting_the_same_bytes_twice_keeps_one_blob(store: FileBlobStore) -> None:
    first = store.put([b"abc"])
    assert store.put([b"abc"]) == first
    assert [p for p in store.root.rglob("*") if p.is_file()] == [store.path(first.sha256)]
    assert list(store.tmp_dir.iterdir()) == []


def test_a_staged_blob_is_invisible_until_committed_and_removed_if_not(store: FileBlobStore) -> None:
    sha = hashlib.sha256(b"data").hexdigest()
    with store.stage([b"data"]) as staged:
        assert staged.sha256 == sha
        assert not store.exists(sha)
    assert not staged.path.exists()
    assert not store.exists(sha)


def test_the_limit_is_enforced_while_streaming(store: FileBlobStore) -> None:
    with pytest.raises(PayloadTooLarge):
        store.stage([b"x" * 10, b"x" * 10], limit=15)
    assert list(store.tmp_dir.iterdir()) == []


def test_unknown_and_malformed_names_are_not_found(store: FileBlobStore) -> None:
    assert not store.exists("0" * 64)
    assert not store.exists("../../etc/passwd")
    for name in ("0" * 64, "../../etc/passwd", "A" * 64):
        with pytest.raises(NotFound):
            store.path(name)
        with pytest.raises(NotFound):
            store.open(name)


def test_a_replica_starting_clears_its_own_scratch_and_dead_replicas_but_not_live_ones(tmp_path: Path) -> None:
    """Replicas share the data folder: one starting must not delete another's upload in progress."""
    import os

    from strata.control.plane import STALE_SCRATCH_S, clear_scratch

    root = tmp_path / "tmp"
    own, live, dead = root / "host-a.1", root / "host-b.2", root / "host-c.3"
    for folder in (own, live, dead):
        folder.mkdir(parents=True)
        (folder / ".blob.x.tmp").write_bytes(b"upload in progress")
    (root / ".blob.old.tmp").write_bytes(b"left by an older release")
    now = 1_000_000_000.0
    os.utime(live, (now - 60, now - 60))
    os.utime(dead, (now - STALE_SCRATCH_S - 1, now - STALE_SCRATCH_S - 1))
    clear_scratch(root, own, now)
    assert sorted(p.name for p in root.iterdir()) == ["host-b.2"]
    assert (live / ".blob.x.tmp").read_bytes() == b"upload in progress"


def test_a_replica_starting_clears_the_scratch_of_this_hosts_dead_processes_at_once(tmp_path: Path) -> None:
    """A server killed mid-upload left its partial upload: the next start on this host removes it, not a day later;
    a live process's folder on this host, and a recent folder of another host, stay."""
    import os
    import subprocess
    import sys

    from strata.control.plane import clear_scratch

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    dead_pid = int(ended.stdout)
    root = tmp_path / "tmp"
    own = root / f"host-a.{os.getpid()}"
    dead, live, other_host = root / f"host-a.{dead_pid}", root / f"host-a.{os.getppid()}", root / f"host-b.{dead_pid}"
    for folder in (own, dead, live, other_host):
        folder.mkdir(parents=True)
        (folder / ".blob.x.tmp").write_bytes(b"upload")
    now = dead.stat().st_mtime  # all of them fresh
    clear_scratch(root, own, now)
    assert sorted(p.name for p in root.iterdir()) == sorted([live.name, other_host.name])
