"""The signed supply chain with real processes: a control plane with release keys, real agents, real attacks.

Each attack ends in a refusal the node reports with a clear reason and kind, the version it had still serving, and
nothing lost: a blob changed in the server's store, an unsigned package and one signed by an unknown key served by
a server that lost (or swapped) its release keys, and a server restored from an older backup that tries to send
the node back to a version it left (a TUF rollback).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_helpers import push_model

from strata.control.blobs import FileBlobStore
from strata.core.package import Package, package_pieces
from strata.examples.digits import load_data
from strata.localfleet import LocalFleet
from strata.trust.signing import create_release_key

pytestmark = pytest.mark.slow

X = load_data().test_x[:4]


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """The model owner's release key pair."""
    return create_release_key(tmp_path / "keys")


@pytest.fixture
def signed_fleet(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[LocalFleet]:
    """A control plane that requires packages signed by the release key; agents are started by each test."""
    with LocalFleet(tmp_path / "fleet", poll_wait_s=5) as running:
        running.start_server(extra_args=["--release-key", str(keys[1])])
        yield running


def served_version(fleet: LocalFleet, node: str) -> str:
    body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(X.shape), "data": X.ravel().tolist()}]}
    response = httpx.post(f"{fleet.agents[node].serve_url}/v2/models/digits/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def wait_for_failure(fleet: LocalFleet, node: str, version: str, timeout: float = 60) -> dict[str, Any]:
    """The failure the node reports for `version` of digits, once it does."""

    def reported() -> dict[str, Any] | None:
        for failure in fleet.nodes()[node]["failures"]:
            if failure["model"] == "digits" and failure["version"] == version:
                return dict(failure)
        return None

    return fleet.wait_for(reported, timeout, f"{node} to report why it refused digits {version}")


def start_node(fleet: LocalFleet, name: str = "edge-1") -> None:
    fleet.start_agent(name, "device", {"site": "lab"}, extra_args=["--probation", "0"])
    fleet.wait_for(lambda: name in fleet.nodes(), 30, f"{name} to enroll")


def test_a_blob_changed_in_the_servers_store_is_refused_and_v1_keeps_serving(
    signed_fleet: LocalFleet, keys: tuple[Path, Path], digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    fleet = signed_fleet
    start_node(fleet)
    node = fleet.agents["edge-1"]
    # the server lists the node once it has stored the enrollment; the agent pins the keys from the answer after
    pinned = node.data_dir / "trust" / "pinned.json"
    fleet.wait_for(pinned.is_file, 30, "edge-1 to pin the release key from its enrollment")
    fleet.wait_for(lambda: fleet.nodes()["edge-1"]["supply"] == "verified", 30, "edge-1 to report verified supply")

    v1 = push_model(fleet, digits_onnx, "1", tmp_path, sign_key=keys[0])
    fleet.client.deploy("digits", "1", {"site": "lab"})
    fleet.wait_for_versions({"edge-1": {"digits": "1"}})
    assert served_version(fleet, "edge-1") == "1"

    v2 = push_model(fleet, digits_onnx_v2, "2", tmp_path, sign_key=keys[0])
    changed = tamper_pieces(fleet, v2, v1)
    assert changed
    fleet.client.deploy("digits", "2", {"site": "lab"})

    failure = wait_for_failure(fleet, "edge-1", "2")
    assert failure["kind"] == "download"
    assert "bytes changed at the source or on the way" in failure["reason"]
    assert changed[0] in failure["reason"]
    assert fleet.nodes()["edge-1"]["models"] == {"digits": "1"}
    assert served_version(fleet, "edge-1") == "1"
    state = json.loads((node.data_dir / "state.json").read_text())
    assert state["models"]["digits"]["active"]["digest"] == v1.digest


def tamper_pieces(fleet: LocalFleet, package: Package, keep: Package) -> list[str]:
    """Flip a byte in every stored piece of `package` that `keep` does not share (as an attacker with write access
    to the server's blob store would); return the pieces changed."""
    store = FileBlobStore(fleet.server_dir / "blobs", fleet.server_dir / "tmp")
    shared = set(package_pieces(keep.manifest))
    changed = []
    for piece in package_pieces(package.manifest)[1:]:  # the manifest itself is its digest: leave it
        if piece in shared:
            continue
        path = store.path(piece)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        changed.append(piece)
    return changed


def test_unsigned_and_unknown_key_packages_are_refused_by_the_node(
    signed_fleet: LocalFleet, keys: tuple[Path, Path], digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    fleet = signed_fleet
    start_node(fleet)
    push_model(fleet, digits_onnx, "1", tmp_path, sign_key=keys[0])
    fleet.client.deploy("digits", "1", {"site": "lab"})
    fleet.wait_for_versions({"edge-1": {"digits": "1"}})

    # The server loses its release keys (misconfigured, or compromised) and takes an unsigned version 2.
    fleet.stop_server()
    fleet.start_server()
    push_model(fleet, digits_onnx_v2, "2", tmp_path / "unsigned")
    fleet.client.deploy("digits", "2", {"site": "lab"})
    unsigned = wait_for_failure(fleet, "edge-1", "2")
    assert unsigned["kind"] == "signature"
    assert "is not signed" in unsigned["reason"]
    assert served_version(fleet, "edge-1") == "1"

    # Then it is told another release key, and takes a version 3 signed by it.
    other_private, other_public = create_release_key(tmp_path / "other-keys", "impostor")
    fleet.stop_server()
    fleet.start_server(extra_args=["--release-key", str(other_public)])
    push_model(fleet, digits_onnx_v2, "3", tmp_path / "impostor", sign_key=other_private)
    fleet.client.deploy("digits", "3", {"site": "lab"})
    impostor = wait_for_failure(fleet, "edge-1", "3")
    assert impostor["kind"] == "signature"
    assert "not by a trusted release key" in impostor["reason"]
    assert fleet.nodes()["edge-1"]["models"] == {"digits": "1"}
    assert served_version(fleet, "edge-1") == "1"


def test_a_server_restored_from_an_old_backup_cannot_roll_the_node_back(
    signed_fleet: LocalFleet, keys: tuple[Path, Path], digits_onnx: Path, digits_onnx_v2: Path, tmp_path: Path
) -> None:
    fleet = signed_fleet
    start_node(fleet)
    env = {**fleet._env(), "STRATA_SERVER": fleet.server_url, "STRATA_TOKEN": fleet.admin_token}
    pushed = subprocess.run(
        [sys.executable, "-m", "strata", "model", "push", str(digits_onnx), "--name", "digits", "--version", "1",
         "--sign-key", str(keys[0]), "--json"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)[0]["signature"]
    fleet.client.deploy("digits", "1", {"site": "lab"})
    fleet.wait_for_versions({"edge-1": {"digits": "1"}})

    backup = tmp_path / "backup"
    fleet.stop_server()
    copy_database(fleet.server_dir, backup)
    fleet.start_server(extra_args=["--release-key", str(keys[1])])
    push_model(fleet, digits_onnx_v2, "2", tmp_path, sign_key=keys[0])
    fleet.client.deploy("digits", "2", {"site": "lab"})
    fleet.wait_for_versions({"edge-1": {"digits": "2"}})

    # The old database comes back: it says digits 1 (still on the node, in its previous slot), with TUF metadata
    # older than what the node has already seen.
    fleet.stop_server()
    copy_database(backup, fleet.server_dir)
    fleet.start_server(extra_args=["--release-key", str(keys[1])])
    failure = wait_for_failure(fleet, "edge-1", "1")
    assert failure["kind"] == "tuf"
    assert "director metadata refused (rollback or mix-and-match)" in failure["reason"]
    assert fleet.nodes()["edge-1"]["models"] == {"digits": "2"}
    assert served_version(fleet, "edge-1") == "2"
    assert (fleet.agents["edge-1"].data_dir / "packages").is_dir()


def copy_database(source: Path, target: Path) -> None:
    """Copy the SQLite database (with its WAL, if any) of a stopped server."""
    target.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        (target / f"strata.db{suffix}").unlink(missing_ok=True)
        if (source / f"strata.db{suffix}").exists():
            shutil.copy2(source / f"strata.db{suffix}", target / f"strata.db{suffix}")
