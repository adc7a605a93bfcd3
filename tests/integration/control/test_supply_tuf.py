"""TUF attacks against a node's verification, with the real control plane's metadata and the node's real checks.

The control plane (in-process, with a release key) publishes the image and director repositories; the node's
verification (`strata.trust.verify.check_target`, what its child process runs) reads them through a fetcher that
an attacker controls: a compromised mirror replaying, withholding, padding or swapping files, or a compromised
server holding the online keys. Every attack ends in a refusal that names it, and the node's trusted metadata is
left as it was.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from control_harness import Harness, ManualClock, StartServer
from supply_harness import Node, SignedPackage, enroll_node, make_signed, server_signer, upload_signed
from tuf.api.metadata import Metadata

from strata.control.plane import ControlPlane
from strata.control.settings import ServerSettings
from strata.core.errors import MetadataError, SignatureError
from strata.trust.expiry import Expiries
from strata.trust.signing import create_release_key
from strata.trust.targets import TargetFacts
from strata.trust.tuf_repo import (
    Delegation,
    build_director_targets,
    build_image_targets,
    build_snapshot,
    build_timestamp,
    load_signer,
    meta_file,
    release_key,
    release_role,
)

DAY = 86400.0


@pytest.fixture
def clock() -> ManualClock:
    # python-tuf's client judges expiry by the real clock, so the server's starts at the real time.
    return ManualClock(time.time())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_release_key(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def signed(
    digits_onnx: Path, digits_onnx_v2: Path, keys: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, SignedPackage]:
    out = tmp_path_factory.mktemp("signed")
    return {
        "1": make_signed(digits_onnx, out / "v1", keys[0], "1"),
        "2": make_signed(digits_onnx_v2, out / "v2", keys[0], "2"),
        "3": make_signed(digits_onnx, out / "v3", keys[0], "3", profile="x86_64-avx2"),
    }


@pytest.fixture
def supply_server(settings: ServerSettings, start_server: StartServer, keys: tuple[Path, Path]) -> Iterator[Harness]:
    with start_server(replace(settings, release_keys=(keys[1],))) as harness:
        yield harness


@pytest.fixture
def node(supply_server: Harness, signed: dict[str, SignedPackage], tmp_path: Path) -> Node:
    """A node enrolled with the server, whose desired state is digits 1 (signed)."""
    upload_signed(supply_server, signed["1"])
    supply_server.deploy("digits", "1", {"site": "lab"})
    return enroll_node(supply_server, tmp_path / "node")


def served(harness: Harness, repository: str, name: str) -> bytes:
    response = harness.client.get(f"/v1/tuf/{repository}/{name}", headers=harness.admin)
    assert response.status_code == 200, response.text
    return response.content


def version(body: bytes) -> int:
    return int(Metadata.from_bytes(body).signed.version)


def resigned(body: bytes, signer_name: str, harness: Harness, **changes: object) -> bytes:
    """`body` with its signed part changed and signed again with a stolen online key."""
    metadata = Metadata.from_bytes(body)
    for key, value in changes.items():
        setattr(metadata.signed, key, value)
    metadata.signatures.clear()
    metadata.sign(server_signer(harness, signer_name))
    return metadata.to_bytes()


def test_a_signed_desired_package_is_vouched_for_by_both_repositories(
    node: Node, signed: dict[str, SignedPackage]
) -> None:
    facts = node.check()
    assert facts.digest == signed["1"].digest
    assert (facts.path, facts.profile, facts.version) == ("digits/1/cpu-generic-fp32", "cpu-generic", "1")
    assert version(node.trusted("director", "timestamp")) >= 1
    assert (node.data_dir / "trust" / "tuf" / "image" / "digits%2F1%2Fcpu-generic-fp32.json").is_file()


def test_rollback_to_an_older_timestamp_is_refused(
    node: Node, supply_server: Harness, signed: dict[str, SignedPackage]
) -> None:
    node.check()
    old = node.trusted("image", "timestamp")
    upload_signed(supply_server, signed["2"])  # the image repository moves on
    node.check()
    newer = node.trusted("image", "timestamp")
    assert version(newer) > version(old)

    node.fetcher.overrides[("image", "timestamp.json")] = old
    with pytest.raises(MetadataError, match=r"image metadata refused \(rollback or mix-and-match\)"):
        node.check()
    assert node.trusted("image", "timestamp") == newer


def test_rollback_to_an_older_snapshot_or_targets_is_refused_even_with_stolen_online_keys(
    node: Node, supply_server: Harness, signed: dict[str, SignedPackage]
) -> None:
    upload_signed(supply_server, signed["2"])
    node.check()
    timestamp = node.trusted("image", "timestamp")
    snapshot = node.trusted("image", "snapshot")
    snapshot_version, targets_version = (
        version(snapshot),
        Metadata.from_bytes(snapshot).signed.meta["targets.json"].version,
    )
    older_snapshot = served(supply_server, "image", f"{snapshot_version - 1}.snapshot.json")

    # A timestamp signed with the stolen timestamp key, naming the snapshot before the one the node has.
    node.fetcher.overrides[("image", "timestamp.json")] = resigned(
        timestamp,
        "image-timestamp",
        supply_server,
        version=version(timestamp) + 1,
        snapshot_meta=meta_file(snapshot_version - 1, older_snapshot),
    )
    with pytest.raises(MetadataError, match=r"rollback or mix-and-match.*snapshot"):
        node.check()

    # A new snapshot signed with the stolen snapshot key, naming the targets before the ones the node has.
    older_targets = served(supply_server, "image", f"{targets_version - 1}.targets.json")
    meta = dict(Metadata.from_bytes(snapshot).signed.meta)
    meta["targets.json"] = meta_file(targets_version - 1, older_targets)
    forged_snapshot = resigned(snapshot, "image-snapshot", supply_server, version=snapshot_version + 1, meta=meta)
    node.fetcher.overrides[("image", "timestamp.json")] = resigned(
        timestamp,
        "image-timestamp",
        supply_server,
        version=version(timestamp) + 1,
        snapshot_meta=meta_file(snapshot_version + 1, forged_snapshot),
    )
    node.fetcher.overrides[("image", f"{snapshot_version + 1}.snapshot.json")] = forged_snapshot
    with pytest.raises(MetadataError, match=r"rollback or mix-and-match.*targets"):
        node.check()
    assert node.trusted("image", "snapshot") == snapshot


def test_stale_metadata_is_refused_freeze(
    supply_server: Harness, signed: dict[str, SignedPackage], clock: ManualClock, tmp_path: Path
) -> None:
    # Everything the server signs now is what a mirror frozen two days ago would still hand out.
    clock.now = time.time() - 2 * DAY
    upload_signed(supply_server, signed["1"])
    supply_server.deploy("digits", "1", {"site": "lab"})
    node = enroll_node(supply_server, tmp_path / "node")
    with pytest.raises(MetadataError, match=r"stale metadata \(freeze\)"):
        node.check()
    assert not (node.data_dir / "trust" / "tuf" / "director" / "timestamp.json").exists()


def test_mix_and_match_of_metadata_that_never_existed_together_is_refused(
    node: Node, supply_server: Harness, signed: dict[str, SignedPackage], tmp_path: Path
) -> None:
    upload_signed(supply_server, signed["2"])
    snapshot = served(supply_server, "image", "snapshot.json")
    current = Metadata.from_bytes(snapshot).signed.meta["targets.json"].version
    older_targets = served(supply_server, "image", f"{current - 1}.targets.json")
    # A mirror answers the request for the current targets with the previous ones (validly signed, just older).
    node.fetcher.overrides[("image", f"{current}.targets.json")] = older_targets
    with pytest.raises(MetadataError, match=r"image metadata refused \(mix-and-match or tampered metadata\)"):
        node.check()


def test_endless_data_is_cut_off(node: Node, supply_server: Harness) -> None:
    node.fetcher.overrides[("image", "timestamp.json")] = lambda body: body + b" " * (64 << 10)
    with pytest.raises(MetadataError, match=r"image metadata refused \(endless data\)"):
        node.check()
    del node.fetcher.overrides[("image", "timestamp.json")]

    # The snapshot may be no longer than the timestamp says it is.
    snapshot_version = version(served(supply_server, "image", "snapshot.json"))
    node.fetcher.overrides[("image", f"{snapshot_version}.snapshot.json")] = lambda body: body + b" " * 100
    with pytest.raises(MetadataError, match=r"image metadata refused \(endless data\)"):
        node.check()
    assert not (node.data_dir / "trust" / "tuf" / "image" / "snapshot.json").exists()


def test_a_target_for_another_profile_is_refused(
    supply_server: Harness, signed: dict[str, SignedPackage], tmp_path: Path
) -> None:
    upload_signed(supply_server, signed["3"])  # built for x86_64-avx2
    supply_server.deploy("digits", "3", {"site": "lab"})
    node = enroll_node(supply_server, tmp_path / "arm", profile="arm64-neon")
    _, variant = node.desired_variant()
    assert variant["profile"] == "x86_64-avx2"
    with pytest.raises(MetadataError, match=r"built for profile x86_64-avx2 .* arm64-neon cannot run"):
        node.check()

    # A server that lies about the profile in the desired state is caught by the release-signed target.
    lying = {**variant, "profile": "cpu-generic"}
    with pytest.raises(MetadataError, match=r"not the signed package: profile 'cpu-generic' \(signed: 'x86_64-avx2'\)"):
        node.check(variant=lying)


def test_the_director_and_image_repositories_must_agree(
    node: Node, supply_server: Harness, signed: dict[str, SignedPackage]
) -> None:
    node.check()
    upload_signed(supply_server, signed["2"])
    v2 = facts_of(signed["2"])
    # A compromised server with the director's online keys tells the node that digits 1 is v2's bytes.
    forged = replace(v2, path="digits/1/cpu-generic-fp32", version="1")
    now = time.time()
    timestamp = node.trusted("director", "timestamp")
    targets_version = version(node.trusted("director", "targets")) + 1
    snapshot_version = version(node.trusted("director", "snapshot")) + 1
    director_targets = build_director_targets(
        [forged], targets_version, now, Expiries(), server_signer(supply_server, "director-targets")
    )
    director_snapshot = build_snapshot(
        {"targets": (targets_version, director_targets)},
        snapshot_version,
        now,
        Expiries(),
        server_signer(supply_server, "director-snapshot"),
    )
    node.fetcher.overrides.update(
        {
            ("director", "timestamp.json"): build_timestamp(
                snapshot_version,
                director_snapshot,
                version(timestamp) + 1,
                now,
                Expiries(),
                server_signer(supply_server, "director-timestamp"),
            ),
            ("director", f"{snapshot_version}.snapshot.json"): director_snapshot,
            ("director", f"{targets_version}.targets.json"): director_targets,
        }
    )
    lying = {**node.desired_variant()[1], "digest": signed["2"].digest}
    with pytest.raises(
        MetadataError, match=r"director and image repositories disagree about digits/1/cpu-generic-fp32"
    ):
        node.check(variant=lying, version="1")


def facts_of(package: SignedPackage) -> TargetFacts:
    """The target a package's release role vouches for."""
    role = Metadata.from_bytes(package.signature.release_role).signed
    [target] = role.targets.values()
    return TargetFacts.parse(target.path, target.length, target.hashes, target.custom)


def test_a_package_role_signed_by_a_key_the_node_did_not_pin_is_refused(
    node: Node, supply_server: Harness, signed: dict[str, SignedPackage], tmp_path: Path
) -> None:
    node.check()
    # A compromised server (all online keys) delegates digits 1 to its own key and signs the package role with it.
    attacker_private, attacker_public = create_release_key(tmp_path / "attacker")
    now = time.time()
    facts = facts_of(signed["1"])
    role = release_role(facts, load_signer(attacker_private.read_bytes()), now, DAY)
    timestamp = node.trusted("image", "timestamp")
    snapshot = node.trusted("image", "snapshot")
    targets_version = Metadata.from_bytes(snapshot).signed.meta["targets.json"].version + 1
    snapshot_version = version(snapshot) + 1
    targets = build_image_targets(
        [Delegation(facts.path, release_key(attacker_public.read_bytes()))],
        targets_version,
        now,
        Expiries(),
        server_signer(supply_server, "image-targets"),
    )
    roles = {"targets": (targets_version, targets), facts.path: (int(now), role)}
    forged_snapshot = build_snapshot(
        roles, snapshot_version, now, Expiries(), server_signer(supply_server, "image-snapshot")
    )
    node.fetcher.overrides.update(
        {
            ("image", "timestamp.json"): build_timestamp(
                snapshot_version,
                forged_snapshot,
                version(timestamp) + 1,
                now,
                Expiries(),
                server_signer(supply_server, "image-timestamp"),
            ),
            ("image", f"{snapshot_version}.snapshot.json"): forged_snapshot,
            ("image", f"{targets_version}.targets.json"): targets,
            ("image", f"{int(now)}.{facts.path}.json"): role,
        }
    )
    with pytest.raises(SignatureError, match=r"not by a trusted release key"):
        node.check()


def test_replicas_publishing_the_same_metadata_at_once_never_collide(
    settings: ServerSettings, start_server: StartServer, clock: ManualClock
) -> None:
    # Two replicas on one database; every online role is due for refresh, and nodes ask both at once. A version
    # is the newest stored plus one, so both would write the same one: publishing is serialized across replicas.
    with start_server(settings) as first, start_server(settings) as second:
        node = first.enroll("edge-1", {"site": "lab"})
        clock.advance(400 * 86400)
        barrier = threading.Barrier(8)
        answers: list[bytes | Exception] = []

        def ask(plane: ControlPlane, node_id: str | None) -> None:
            barrier.wait()
            try:
                answers.append(plane.supply.metadata("timestamp.json", node_id))
            except Exception as exc:  # collected: the assertion below names it
                answers.append(exc)

        askers = [(h.plane, n) for h in (first, second) for n in (None, node.node_id)] * 2
        threads = [threading.Thread(target=ask, args=asker) for asker in askers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [a for a in answers if isinstance(a, Exception)] == []
        assert len(answers) == 8
