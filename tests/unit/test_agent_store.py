"""The agent's artifact store and resumable fetcher, on real files (the transport is an in-memory peer)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from strata.agent.fetch import RateLimiter, download_blob
from strata.agent.state import NodeState, SlotRef
from strata.agent.store import ArtifactStore
from strata.agent.transport import HttpResponse
from strata.agent.vault import OVERHEAD, Vault
from strata.core.chunking import Chunk, offsets
from strata.core.errors import TransportError, VerificationError
from strata.core.hashing import canonical_json
from strata.core.package import Package
from strata.package_build import build_package


class BlobPeer:
    """Serves one blob with Range support; can cut the connection after `cut_after` bytes."""

    def __init__(self, data: bytes, cut_after: int | None = None, honour_range: bool = True) -> None:
        self.data = data
        self.cut_after = cut_after
        self.honour_range = honour_range
        self.ranges: list[str | None] = []

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None = None, timeout: float
    ) -> HttpResponse:
        raise AssertionError("not used")

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, headers: Mapping[str, str], timeout: float) -> Iterator[_Body]:
        wanted = headers.get("range")
        self.ranges.append(wanted)
        start = int(wanted.split("=")[1].rstrip("-")) if wanted and self.honour_range else 0
        if start > len(self.data):
            yield _Body(416, b"", None)
            return
        yield _Body(206 if start else 200, self.data[start:], self.cut_after)


class _Body:
    def __init__(self, status: int, data: bytes, cut_after: int | None) -> None:
        self.status = status
        self.headers: dict[str, str] = {}
        self._data = data
        self._pos = 0
        self._cut = cut_after

    def read(self, size: int) -> bytes:
        if self._cut is not None and self._pos >= self._cut:
            raise TransportError("connection reset")
        end = self._pos + size if self._cut is None else min(self._pos + size, self._cut)
        piece = self._data[self._pos : end]
        self._pos += len(piece)
        return piece


DATA = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


def test_download_resumes_after_a_cut_without_resending(tmp_path: Path) -> None:
    dest = tmp_path / SHA
    peer = BlobPeer(DATA, cut_after=300_000)
    with pytest.raises(TransportError):
        download_blob(peer, "u", dest, sha256=SHA, size=len(DATA), headers={})
    part = dest.with_name(dest.name + ".part")
    assert part.stat().st_size == 300_000
    peer.cut_after = None
    result = download_blob(peer, "u", dest, sha256=SHA, size=len(DATA), headers={})
    assert result.resumed_from == 300_000
    assert result.received == len(DATA) - 300_000
    assert peer.ranges == [None, "bytes=300000-"]
    assert dest.read_bytes() == DATA
    assert not part.exists()


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path) -> None:
    dest = tmp_path / SHA
    dest.with_name(dest.name + ".part").write_bytes(DATA[:1000])
    result = download_blob(BlobPeer(DATA, honour_range=False), "u", dest, sha256=SHA, size=len(DATA), headers={})
    assert result.resumed_from == 0
    assert dest.read_bytes() == DATA


def test_corrupt_bytes_are_discarded(tmp_path: Path) -> None:
    bad = bytearray(DATA)
    bad[5000] ^= 1
    dest = tmp_path / SHA
    with pytest.raises(VerificationError, match="discarded"):
        download_blob(BlobPeer(bytes(bad)), "u", dest, sha256=SHA, size=len(DATA), headers={})
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()


def test_longer_than_promised_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / SHA
    with pytest.raises(VerificationError, match="longer"):
        download_blob(BlobPeer(DATA + b"more"), "u", dest, sha256=SHA, size=len(DATA), headers={})


def _seal(data: bytes) -> bytes:
    """Stands in for the vault's sealing (tested on its own): the same length change, a recognisable result."""
    return b"S" * OVERHEAD + data


def test_a_sealed_download_reaches_its_name_only_sealed(tmp_path: Path) -> None:
    """The clear bytes never sit under the blob's name: a kill leaves the part file or the sealed blob (issue 17)."""
    dest = tmp_path / SHA
    part = dest.with_name(dest.name + ".part")
    with pytest.raises(TransportError):
        download_blob(BlobPeer(DATA, cut_after=300_000), "u", dest, sha256=SHA, size=len(DATA), headers={}, seal=_seal)
    assert not dest.exists()
    result = download_blob(BlobPeer(DATA), "u", dest, sha256=SHA, size=len(DATA), headers={}, seal=_seal)
    assert result.resumed_from == 300_000
    assert dest.read_bytes() == _seal(DATA)
    assert not part.exists()
    part.write_bytes(DATA)  # a kill after the sealed blob was renamed in, before its part file was removed
    peer = BlobPeer(DATA)
    download_blob(peer, "u", dest, sha256=SHA, size=len(DATA), headers={}, seal=_seal)
    assert peer.ranges == []
    assert not part.exists()


def test_a_piece_not_kept_as_the_store_keeps_pieces_is_fetched_again(tmp_path: Path) -> None:
    """With a vault, a piece in the clear (a kill between writing and sealing it, by an earlier agent) or cut short
    is removed and reported missing; one of the sealed length is held (issue 17)."""
    store = ArtifactStore(tmp_path, Vault(tmp_path / "trust"))  # has_piece never starts the vault's worker
    store.pieces_dir.mkdir()
    path = store.piece_path(SHA)
    assert not store.has_piece(SHA, len(DATA))
    for spoiled in (DATA, _seal(DATA)[:-1]):
        path.write_bytes(spoiled)
        assert not store.has_piece(SHA, len(DATA))
        assert not path.exists()
    path.write_bytes(_seal(DATA))
    assert store.has_piece(SHA, len(DATA))
    assert not ArtifactStore(tmp_path).has_piece(SHA, len(DATA))  # sealed where pieces are kept in the clear


def test_the_agent_knows_the_sealed_length_without_loading_cryptography() -> None:
    from strata.trust import vault

    assert OVERHEAD == vault.OVERHEAD


def test_rate_limiter_is_pure_in_its_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(1000, clock=lambda: now[0])
    assert limiter.delay_for(500) == pytest.approx(0.5)
    now[0] = 2.0
    assert limiter.delay_for(500) == 0.0
    assert RateLimiter(None).delay_for(10**9) == 0.0


@pytest.fixture
def package(digits_onnx: Path, tmp_path: Path) -> Package:
    return build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")


def deliver(store: ArtifactStore, package: Package, skip: frozenset[str] = frozenset()) -> None:
    """Put a package's manifest and pieces where a finished download leaves them."""
    store.save_manifest(package.digest, canonical_json(package.manifest.to_json()))
    for entry in package.manifest.files:
        data = (package.path / entry.path).read_bytes()
        for offset, chunk in offsets(entry.chunks or (Chunk(entry.sha256, entry.size),)):
            if chunk.sha256 not in skip:
                store.pieces_dir.mkdir(parents=True, exist_ok=True)
                store.piece_path(chunk.sha256).write_bytes(data[offset : offset + chunk.size])
    store.mark_downloaded("b" * 64)


def test_assemble_verifies_and_state_commits_atomically(package: Package, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "node")
    deliver(store, package)
    assert store.downloaded_blobs() == {"b" * 64}
    staged = store.assemble("b" * 64, package.digest)
    assert staged.digest == package.digest
    assert store.staged_digests() == {package.digest}
    assert store.downloaded_blobs() == frozenset()  # pieces, manifest and mark are gone once assembled
    assert not any(store.pieces_dir.iterdir())

    slot = SlotRef(package.digest, "1", package.manifest.variant, 1.0)
    store.save_state(NodeState().with_active("digits", slot))
    assert store.load_state().models["digits"].active == slot


def test_a_manifest_that_is_not_the_promised_one_is_refused(package: Package, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "node")
    with pytest.raises(VerificationError, match="does not hash"):
        store.save_manifest("sha256:" + "0" * 64, canonical_json(package.manifest.to_json()))


def test_a_corrupt_piece_fails_assembly_and_is_discarded(package: Package, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "node")
    deliver(store, package)
    victim = package.manifest.files[0].sha256
    store.piece_path(victim).write_bytes(b"tampered")
    with pytest.raises(VerificationError, match="does not hash"):
        store.assemble("b" * 64, package.digest)
    assert store.staged_digests() == frozenset()
    assert not store.piece_path(victim).exists()
    assert store.downloaded_blobs() == frozenset()  # the next attempt fetches again
    assert not any(p.name.startswith(".staging") for p in store.packages.iterdir())


def test_pieces_held_in_an_earlier_package_are_reused(mlp_versions: tuple[Path, Path], tmp_path: Path) -> None:
    import numpy as np

    one = build_package(
        mlp_versions[0], tmp_path / "p1", name="m", version="1", sample={"x": np.zeros((1, 256), np.float32)}
    )
    two = build_package(
        mlp_versions[1], tmp_path / "p2", name="m", version="2", sample={"x": np.zeros((1, 256), np.float32)}
    )
    model_one = one.manifest.file("model.onnx")
    model_two = two.manifest.file("model.onnx")
    assert len(model_one.chunks) > 4
    store = ArtifactStore(tmp_path / "node")
    deliver(store, one)
    store.assemble("b" * 64, one.digest)
    held = store.piece_index()
    # Deliver only what v1 does not hold: assembly takes the rest from v1's package.
    deliver(store, two, skip=frozenset(held))
    store.assemble("b" * 64, two.digest)
    shared = sum(c.size for c in model_two.chunks if c.sha256 in held)
    assert shared > 0.6 * model_two.size  # one of six weight matrices changed
    assert store.staged_digests() == {one.digest, two.digest}


def test_activation_keeps_the_previous_slot() -> None:
    one = SlotRef("sha256:" + "1" * 64, "1", "v", 1.0)
    two = SlotRef("sha256:" + "2" * 64, "2", "v", 2.0)
    state = NodeState().with_active("m", one).with_active("m", two)
    assert state.models["m"].active == two
    assert state.models["m"].previous == one
    rolled_back = state.with_active("m", one)
    assert rolled_back.models["m"].previous == two


def test_damaged_state_file_is_set_aside(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.state_path.write_text("{not json")
    assert store.load_state() == NodeState()
    assert (tmp_path / "state.corrupt").exists()


def test_garbage_collection_removes_leftovers(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    keep = "sha256:" + "a" * 64
    (store.packages / ("a" * 64)).mkdir()
    (store.packages / ("b" * 64)).mkdir()
    (store.packages / ".staging-x").mkdir()
    store.pieces_dir.mkdir()
    (store.pieces_dir / ("c" * 64 + ".part")).write_bytes(b"x")
    (tmp_path / ".state.json.123.tmp").write_bytes(b"x")
    removed = store.collect_garbage(frozenset({keep}), frozenset())
    assert removed == ["sha256:" + "b" * 64]
    assert sorted(p.name for p in store.packages.iterdir()) == ["a" * 64]
    assert list(store.downloads.iterdir()) == []
    assert not (tmp_path / ".state.json.123.tmp").exists()
