"""Encryption at rest on a node: the real vault worker process, real packages, real onnxruntime.

A model file read off a node's disk is ciphertext (not a loadable model) without that node's key; the agent
decrypts only in memory and checks the manifest's hashes after decryption; changed, moved or foreign bytes are
refused with a clear error.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from strata.agent.children import run_module, set_make_room
from strata.agent.runtime import load_and_check
from strata.agent.store import ArtifactStore
from strata.agent.vault import Vault, VaultUnavailable, file_aad
from strata.core.chunking import Chunk, offsets
from strata.core.errors import VerificationError
from strata.core.hashing import canonical_json
from strata.core.package import Package
from strata.package_build import build_package

BLOB = "b" * 64


@pytest.fixture
def package(digits_onnx: Path, tmp_path: Path) -> Package:
    return build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")


def deliver(store: ArtifactStore, package: Package, skip: frozenset[str] = frozenset()) -> None:
    """What a finished download leaves: the manifest and every piece (sealed, as the fetcher writes them)."""
    store.save_manifest(package.digest, canonical_json(package.manifest.to_json()))
    for entry in package.manifest.files:
        data = (package.path / entry.path).read_bytes()
        for offset, chunk in offsets(entry.chunks or (Chunk(entry.sha256, entry.size),)):
            if chunk.sha256 not in skip:
                store.pieces_dir.mkdir(parents=True, exist_ok=True)
                store.write_piece(chunk.sha256, data[offset : offset + chunk.size])
    store.mark_downloaded(BLOB)


def test_a_model_file_on_the_disk_is_not_a_loadable_model_without_the_node_key(
    package: Package, vault: Vault, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "node", vault)
    deliver(store, package)
    for piece in store.pieces_dir.iterdir():  # downloaded pieces are sealed too
        assert piece.read_bytes().startswith(b"SENC1")
    staged = store.assemble(BLOB, package.digest)

    plain = package.model_path.read_bytes()
    on_disk = staged.model_path.read_bytes()
    assert on_disk.startswith(b"SENC1")
    assert plain[64:4096] not in on_disk  # no run of the model's bytes survives
    with pytest.raises(Exception, match=r"(?i)protobuf|parse|invalid|load"):
        ort.InferenceSession(on_disk, providers=["CPUExecutionProvider"])

    # The node itself opens it in memory, checks the hashes, and serves it.
    opened, files = store.open(package.digest)
    assert files is not None
    assert hashlib.sha256(files["model.onnx"]).hexdigest() == package.manifest.file("model.onnx").sha256
    runtime = load_and_check(opened, files=files)
    sample = np.zeros((1, 64), np.float32)
    assert runtime.run({runtime.inputs[0].name: sample}).keys()

    # Another node (another node key, so another data key) cannot open it.
    stranger = Vault(tmp_path / "other" / "trust")
    try:
        with pytest.raises(VerificationError, match="does not open"):
            ArtifactStore(store.root, stranger).open(package.digest)
    finally:
        stranger.close()


def test_changed_or_moved_sealed_bytes_are_refused(
    package: Package, digits_onnx_v2: Path, vault: Vault, tmp_path: Path
) -> None:
    store = ArtifactStore(tmp_path / "node", vault)
    deliver(store, package)
    staged = store.assemble(BLOB, package.digest)
    other = build_package(digits_onnx_v2, tmp_path / "pkg2", name="digits", version="2")
    deliver(store, other)
    other_staged = store.assemble(BLOB, other.digest)

    model = staged.model_path
    original = model.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 1
    model.write_bytes(bytes(flipped))
    with pytest.raises(VerificationError, match=r"model\.onnx does not open"):
        store.open(package.digest)

    # v2's sealed model moved into v1's folder: it decrypts only under its own package digest.
    shutil.copyfile(other_staged.model_path, model)
    with pytest.raises(VerificationError, match=r"changed, moved, or sealed with another key"):
        store.open(package.digest)

    # Plaintext put in place of a sealed file is refused as well (the vault only opens what it sealed).
    shutil.copyfile(package.model_path, model)
    with pytest.raises(VerificationError, match="not sealed"):
        store.open(package.digest)


def test_chunks_of_a_sealed_earlier_version_are_reused(
    mlp_versions: tuple[Path, Path], vault: Vault, tmp_path: Path
) -> None:
    sample = {"x": np.zeros((1, 256), np.float32)}
    one = build_package(mlp_versions[0], tmp_path / "p1", name="m", version="1", sample=sample)
    two = build_package(mlp_versions[1], tmp_path / "p2", name="m", version="2", sample=sample)
    store = ArtifactStore(tmp_path / "node", vault)
    deliver(store, one)
    store.assemble(BLOB, one.digest)
    held = store.piece_index()
    deliver(store, two, skip=frozenset(held))
    store.assemble(BLOB, two.digest)
    shared = sum(c.size for c in two.manifest.file("model.onnx").chunks if c.sha256 in held)
    assert shared > 0.6 * two.manifest.file("model.onnx").size
    _, files = store.open(two.digest)
    assert files is not None
    assert files["model.onnx"] == two.model_path.read_bytes()


def test_packages_kept_in_the_clear_by_an_earlier_agent_are_sealed_at_start(
    package: Package, vault: Vault, tmp_path: Path
) -> None:
    plain_store = ArtifactStore(tmp_path / "node")
    deliver(plain_store, package)
    staged = plain_store.assemble(BLOB, package.digest)
    assert staged.model_path.read_bytes() == package.model_path.read_bytes()

    store = ArtifactStore(tmp_path / "node", vault)
    assert store.seal_plaintext_packages() == [package.digest]
    assert staged.model_path.read_bytes().startswith(b"SENC1")
    _, files = store.open(package.digest)
    assert files is not None
    assert files["model.onnx"] == package.model_path.read_bytes()
    assert store.seal_plaintext_packages() == []  # once


def test_a_data_key_that_does_not_unwrap_stops_the_vault_with_a_clear_error(vault: Vault, tmp_path: Path) -> None:
    sealed = vault.seal(file_aad("sha256:x", "model.onnx"), b"weights")
    assert vault.open(file_aad("sha256:x", "model.onnx"), sealed) == b"weights"
    vault.close()
    key = vault.trust_dir / "node.key"
    key.unlink()  # the node key was replaced (a new one is made): the wrapped data key no longer unwraps
    with pytest.raises(VaultUnavailable, match="does not unwrap"):
        vault.open(file_aad("sha256:x", "model.onnx"), sealed)


def test_the_worker_stops_when_idle_and_starts_again_on_demand(tmp_path: Path) -> None:
    now = [0.0]
    vault = Vault(tmp_path / "trust", idle_s=30, clock=lambda: now[0])
    try:
        sealed = vault.seal(b"a", b"x" * 1000)
        assert vault.running
        now[0] = 10.0
        vault.close_if_idle()
        assert vault.running
        now[0] = 40.0
        vault.close_if_idle()
        assert not vault.running
        assert vault.open(b"a", sealed) == b"x" * 1000
        with pytest.raises(VerificationError, match="changed, moved"):
            vault.open(b"b", sealed)  # the associated data names what the bytes are
        assert vault.running  # a refused decryption does not stop the worker
    finally:
        vault.close()


def test_the_worker_steps_aside_while_another_helper_child_runs(tmp_path: Path) -> None:
    """One cryptography-sized helper at a time: the tree peaks at the agent plus its largest helper."""
    vault = Vault(tmp_path / "trust")
    set_make_room(vault.close)
    try:
        sealed = vault.seal(b"a", b"x" * 1000)
        assert vault.running
        assert run_module("json.tool", [], b"[1]", timeout_s=60, what="a helper") == b"[\n    1\n]\n"
        assert not vault.running
        assert vault.open(b"a", sealed) == b"x" * 1000  # and back on its next call
        assert vault.running
    finally:
        set_make_room(None)
        vault.close()
