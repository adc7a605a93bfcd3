"""The control plane's side of the signed supply chain: signature checks on upload and attach, what nodes pin at
enrollment, what desired states name, and who may read which TUF metadata."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from control_harness import Harness, ManualClock, StartServer, node_key_and_csr
from supply_harness import SignedPackage, enroll_node, make_signed, upload_signed
from tuf.api.metadata import Metadata, Root

from strata.control.settings import ServerSettings
from strata.trust.release import SignedRelease, sign_release
from strata.trust.signing import create_release_key


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(time.time())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_release_key(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_release_key(tmp_path_factory.mktemp("other"), "other")


@pytest.fixture(scope="module")
def signed(
    digits_onnx: Path, digits_onnx_v2: Path, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, SignedPackage]:
    out = tmp_path_factory.mktemp("signed")
    return {
        "1": make_signed(digits_onnx, out / "v1", keys[0], "1"),
        "2": make_signed(digits_onnx_v2, out / "v2", keys[0], "2"),
    }


@pytest.fixture
def supply_server(settings: ServerSettings, start_server: StartServer, keys: tuple[Path, Path]) -> Iterator[Harness]:
    with start_server(replace(settings, release_keys=(keys[1],))) as harness:
        yield harness


def post(server: Harness, tar: bytes, signature: SignedRelease | None = None) -> dict[str, object]:
    headers = {**server.admin, "Content-Type": "application/x-tar"}
    if signature is not None:
        bundle, role = signature.to_base64()
        headers.update({"X-Strata-Signature": bundle, "X-Strata-Release-Role": role})
    response = server.client.post("/v1/packages", content=tar, headers=headers)
    body: dict[str, object] = {"status": response.status_code, **response.json()}
    return body


def test_with_release_keys_an_unsigned_upload_is_refused(
    supply_server: Harness, signed: dict[str, SignedPackage]
) -> None:
    answer = post(supply_server, signed["1"].tar)
    assert answer["status"] == 422
    assert answer["code"] == "signature_invalid"
    assert "accepts only packages signed by a release key" in str(answer["error"])
    assert "upload with `strata package push PKG`" in str(answer["error"])  # the command that does it
    assert "`strata optimize ... --push --sign-key release.key`" in str(answer["error"])  # and the optimizer's way
    assert supply_server.client.get("/v1/models", headers=supply_server.admin).json() == []


def test_health_says_whether_uploads_must_be_signed(supply_server: Harness, server: Harness) -> None:
    # What the CLI asks before it uploads an unsigned package (and refuses at once, not after the whole upload).
    assert supply_server.client.get("/v1/health", headers=supply_server.admin).json()["release_keys"] is True
    assert server.client.get("/v1/health", headers=server.admin).json()["release_keys"] is False


def test_a_package_signed_by_an_unknown_key_is_refused(
    supply_server: Harness, digits_onnx: Path, other_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    impostor = make_signed(digits_onnx, tmp_path / "pkg", other_keys[0], "1")
    answer = post(supply_server, impostor.tar, impostor.signature)
    assert answer["status"] == 422
    assert answer["code"] == "signature_invalid"
    assert "not by a trusted release key" in str(answer["error"])
    assert supply_server.client.get("/v1/models", headers=supply_server.admin).json() == []


def test_a_signature_of_another_package_is_refused(supply_server: Harness, signed: dict[str, SignedPackage]) -> None:
    # v2's role with v1's bytes: the role names another package.
    answer = post(supply_server, signed["1"].tar, signed["2"].signature)
    assert answer["status"] == 422
    assert "the release role is for digits/2/cpu-generic-fp32" in str(answer["error"])
    # v1's role with v2's bundle: the bundle is over other files.
    mixed = SignedRelease(signed["2"].signature.bundle, signed["1"].signature.release_role)
    answer = post(supply_server, signed["1"].tar, mixed)
    assert answer["status"] == 422
    assert answer["code"] == "signature_invalid"


def test_an_expired_release_role_is_refused(
    supply_server: Harness, digits_onnx: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    from strata.core.package import tar_bytes, verify_package
    from strata.package_build import build_package

    package = build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")
    stale = sign_release(package.path, keys[0], time.time() - 3 * 86400, 86400)
    answer = post(supply_server, tar_bytes(verify_package(package.path)), stale)
    assert answer["status"] == 422
    assert answer["code"] == "metadata_refused"
    assert "expired" in str(answer["error"])


def test_a_signed_upload_is_stored_pinned_and_named_in_desired_states(
    supply_server: Harness, signed: dict[str, SignedPackage], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    added = upload_signed(supply_server, signed["1"])
    bundle_id = hashlib.sha256(signed["1"].signature.bundle).hexdigest()
    assert added["signature"] == bundle_id
    [variant] = supply_server.client.get("/v1/models/digits/versions/1", headers=supply_server.admin).json()["variants"]
    assert variant["signature"] == bundle_id
    supply_server.deploy("digits", "1", {"site": "lab"})

    node = enroll_node(supply_server, tmp_path / "node")
    pinned = json.loads((node.data_dir / "trust" / "pinned.json").read_text())
    assert pinned["release_keys"] == [keys[1].read_text()]
    for repository in ("image", "director"):
        root = Metadata[Root].from_bytes(pinned["tuf_roots"][repository].encode()).signed
        keyids = [root.roles[role].keyids[0] for role in ("root", "targets", "snapshot", "timestamp")]
        assert len(set(keyids)) == 4, "every role of a repository has its own key"

    [model] = supply_server.desired(node.credentials).json()["models"]
    assert model["variants"][0]["signature"] == bundle_id
    served = supply_server.client.get(f"/v1/blobs/sha256/{bundle_id}", headers=node.credentials.headers)
    assert served.status_code == 200
    assert served.content == signed["1"].signature.bundle


def test_a_node_reads_only_its_own_director_metadata(
    supply_server: Harness, signed: dict[str, SignedPackage], tmp_path: Path
) -> None:
    upload_signed(supply_server, signed["1"])
    supply_server.deploy("digits", "1", {"site": "lab"})
    first = enroll_node(supply_server, tmp_path / "a", "edge-a")
    second = enroll_node(supply_server, tmp_path / "b", "edge-b")
    own = supply_server.client.get(
        f"/v1/tuf/director/{first.credentials.node_id}/timestamp.json", headers=first.credentials.headers
    )
    assert own.status_code == 200
    other = supply_server.client.get(
        f"/v1/tuf/director/{first.credentials.node_id}/timestamp.json", headers=second.credentials.headers
    )
    assert other.status_code == 403
    image = supply_server.client.get("/v1/tuf/image/timestamp.json", headers=second.credentials.headers)
    assert image.status_code == 200
    missing = supply_server.client.get("/v1/tuf/image/2.root.json", headers=second.credentials.headers)
    assert missing.status_code == 404


def test_director_metadata_follows_the_desired_state_and_versions_survive_a_restart(
    settings: ServerSettings,
    start_server: StartServer,
    keys: tuple[Path, Path],
    signed: dict[str, SignedPackage],
    tmp_path: Path,
) -> None:
    settings = replace(settings, release_keys=(keys[1],))
    with start_server(settings) as server:
        upload_signed(server, signed["1"])
        upload_signed(server, signed["2"])
        server.deploy("digits", "1", {"site": "lab"})
        node = enroll_node(server, tmp_path / "node")
        path = f"/v1/tuf/director/{node.credentials.node_id}/timestamp.json"
        first = Metadata.from_bytes(server.client.get(path, headers=node.credentials.headers).content)
        again = Metadata.from_bytes(server.client.get(path, headers=node.credentials.headers).content)
        assert again.signed.version == first.signed.version  # unchanged desired state, unchanged metadata
        server.deploy("digits", "2", {"site": "lab"})
        changed = Metadata.from_bytes(server.client.get(path, headers=node.credentials.headers).content)
        assert changed.signed.version == first.signed.version + 1
        targets = server.client.get(f"/v1/tuf/director/{node.credentials.node_id}/targets.json", headers=server.admin)
        assert list(Metadata.from_bytes(targets.content).signed.targets) == ["digits/2/cpu-generic-fp32"]
    with start_server(settings) as server:
        after = Metadata.from_bytes(server.client.get(path, headers=node.credentials.headers).content)
        assert after.signed.version == changed.signed.version
        assert after.signed.expires >= changed.signed.expires


def test_a_signature_can_be_attached_to_a_variant_uploaded_before_the_keys(
    settings: ServerSettings,
    start_server: StartServer,
    keys: tuple[Path, Path],
    signed: dict[str, SignedPackage],
    tmp_path: Path,
) -> None:
    with start_server(settings) as server:  # development: no release keys
        assert post(server, signed["1"].tar)["status"] == 201
        refused = post(server, signed["2"].tar, signed["2"].signature)
        assert refused["status"] == 422
        assert "no release keys" in str(refused["error"])
        node = enroll_node_plain(server)
        assert set(node) == {"node_id", "certificate", "ca", "not_after", "issued_at"}  # no release keys, TUF roots
    with start_server(replace(settings, release_keys=(keys[1],))) as server:
        server.deploy("digits", "1", {})
        url = "/v1/models/digits/versions/1/variants/cpu-generic-fp32/signature"
        bundle, role = signed["1"].signature.to_base64()
        attached = server.client.put(url, json={"bundle": bundle, "release_role": role}, headers=server.admin)
        assert attached.status_code == 200, attached.text
        assert attached.json()["digest"] == signed["1"].digest
        [variant] = server.client.get("/v1/models/digits/versions/1", headers=server.admin).json()["variants"]
        assert variant["signature"] == attached.json()["signature"]

        # An older signing of the same package does not replace a newer one.
        signed_at = Metadata.from_bytes(signed["1"].signature.release_role).signed.version
        older = sign_release(signed["1"].path, keys[0], signed_at - 60, 86400)
        stale_bundle, stale_role = older.to_base64()
        conflict = server.client.put(
            url, json={"bundle": stale_bundle, "release_role": stale_role}, headers=server.admin
        )
        assert conflict.status_code == 409, conflict.text
        garbage = server.client.put(url, json={"bundle": "!!", "release_role": role}, headers=server.admin)
        assert garbage.status_code == 422
        node = enroll_node(server, tmp_path / "node")
        assert (
            server.client.put(
                url, json={"bundle": bundle, "release_role": role}, headers=node.credentials.headers
            ).status_code
            == 403
        )


def enroll_node_plain(server: Harness) -> dict[str, str]:
    token = server.client.post("/v1/enrollment-tokens", json={}, headers=server.admin).json()["token"]
    body = {
        "token": token,
        "name": "dev-node",
        "tier": "device",
        "labels": {},
        "profile": "cpu-generic",
        "csr": node_key_and_csr("dev-node"),
    }
    answer: dict[str, str] = server.client.post("/v1/enroll", json=body).json()
    return answer
