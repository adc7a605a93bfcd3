"""Release signatures in the OpenSSF model-signing format: the model_signing tooling verifies strata's, and strata
refuses what is unsigned, signed by another key, changed, or signed over other files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import model_signing
import pytest

from strata.core.errors import ConfigError, MetadataError, SignatureError
from strata.core.hashing import canonical_json
from strata.core.package import Package, read_manifest, verify_package
from strata.package_build import build_package
from strata.trust.release import SignedRelease, sign_release, signature_paths
from strata.trust.signing import (
    canonicalize_manifest,
    create_release_key,
    key_hint,
    sign_package,
    verify_package_signature,
)
from strata.trust.targets import facts_of_manifest
from strata.trust.tuf_repo import check_release_role


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_release_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def package(digits_onnx: Path, tmp_path: Path) -> Package:
    return build_package(digits_onnx, tmp_path / "digits-1", name="digits", version="1")


def test_model_signing_tooling_verifies_a_strata_signed_package(
    package: Package, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    digest = package.digest
    signed = sign_release(package.path, keys[0], time.time(), 86400)
    bundle_path, role_path = signed.write(package.path)
    assert (bundle_path, role_path) == (tmp_path / "digits-1.sig", tmp_path / "digits-1.targets.json")
    assert not any(p.name.endswith((".sig", ".targets.json")) for p in package.path.iterdir())
    # Signing rewrote the manifest in its canonical form (the bytes nodes assemble); the digest is the same.
    assert (package.path / "manifest.json").read_bytes() == canonical_json(package.manifest.to_json())
    assert verify_package(package.path, digest).digest == digest

    # model_signing's own Python API ...
    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(package.path, bundle_path)
    # ... and its command line.
    cli = subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", "--public_key", str(keys[1]),
         "--signature", str(bundle_path), str(package.path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "Verification succeeded" in cli.stdout + cli.stderr

    # The same checks strata's nodes and server make.
    assert verify_package_signature(package.path, signed.bundle, [keys[1].read_text()], digest) == key_hint(
        keys[1].read_bytes()
    )
    manifest = read_manifest(package.path)
    canonical = canonical_json(manifest.to_json())
    expected = facts_of_manifest(manifest.to_json(), len(canonical), digest.removeprefix("sha256:"))
    role = check_release_role(signed.release_role, [keys[1].read_text()], time.time(), expected)
    assert (role.name, role.target.digest) == ("digits/1/cpu-generic-fp32", digest)
    assert SignedRelease.read(package.path) == signed


def test_model_signing_tooling_refuses_a_changed_strata_package(
    package: Package, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    bundle = sign_package(package.path, keys[0])
    bundle_path = tmp_path / "digits-1.sig"
    bundle_path.write_bytes(bundle)
    golden = package.path / "golden.npz"
    golden.write_bytes(golden.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="Signature mismatch"):
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys[1]).verify(package.path, bundle_path)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_package_signature(package.path, bundle, [keys[1].read_text()])


def test_a_signature_by_another_key_is_refused(package: Package, keys: tuple[Path, Path], tmp_path: Path) -> None:
    other_private, other_public = create_release_key(tmp_path / "other", "other")
    bundle = sign_package(package.path, other_private)
    with pytest.raises(SignatureError, match="signed by an unknown key"):
        verify_package_signature(package.path, bundle, [keys[1].read_text()])
    assert verify_package_signature(package.path, bundle, [keys[1].read_text(), other_public.read_text()])
    with pytest.raises(SignatureError, match="no release keys"):
        verify_package_signature(package.path, bundle, [])


def test_a_signature_over_other_files_is_refused(package: Package, keys: tuple[Path, Path], tmp_path: Path) -> None:
    canonicalize_manifest(package.path)
    # A bundle that leaves a file out (signed with model-signing's ignore list) does not vouch for the package.
    bundle_path = tmp_path / "partial.sig"
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["golden.npz"], ignore_git_paths=True)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=keys[0]).set_hashing_config(hashing).sign(
        package.path, bundle_path
    )
    with pytest.raises(SignatureError, match=r"unsigned \['golden.npz'\]"):
        verify_package_signature(package.path, bundle_path.read_bytes(), [keys[1].read_text()])

    # A good signature of another folder is not one of this package (and nor is its digest).
    copy = tmp_path / "copy"
    shutil.copytree(package.path, copy)
    bundle = sign_package(copy, keys[0])
    with pytest.raises(SignatureError, match="expected sha256:"):
        verify_package_signature(package.path, bundle, [keys[1].read_text()], "sha256:" + "0" * 64)


def test_a_release_role_is_checked_against_the_package_key_and_clock(
    package: Package, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    now = time.time()
    signed = sign_release(package.path, keys[0], now, 3600)
    manifest = read_manifest(package.path)
    canonical = canonical_json(manifest.to_json())
    expected = facts_of_manifest(manifest.to_json(), len(canonical), manifest.digest.removeprefix("sha256:"))
    trusted = [keys[1].read_text()]
    assert check_release_role(signed.release_role, trusted, now, expected).version == int(now)
    with pytest.raises(MetadataError, match="expired"):
        check_release_role(signed.release_role, trusted, now + 7200, expected)
    other = expected.__class__(**{**expected.__dict__, "sha256": "0" * 64})
    with pytest.raises(MetadataError, match="not digits/1/cpu-generic-fp32"):
        check_release_role(signed.release_role, trusted, now, other)
    _, other_public = create_release_key(tmp_path / "other", "other")
    with pytest.raises(SignatureError, match="not by a trusted release key"):
        check_release_role(signed.release_role, [other_public.read_text()], now, expected)
    forged = json.loads(signed.release_role)
    forged["signed"]["targets"]["digits/1/cpu-generic-fp32"]["length"] += 1
    with pytest.raises(SignatureError, match="does not verify"):
        check_release_role(json.dumps(forged).encode(), trusted, now)


def test_keys_are_never_overwritten_and_signing_needs_a_real_key(
    package: Package, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="never overwritten"):
        create_release_key(keys[0].parent)
    assert keys[0].stat().st_mode & 0o077 == 0
    with pytest.raises(ConfigError):
        sign_release(package.path, keys[1], time.time(), 3600)  # the public key
    with pytest.raises(ConfigError, match="positive"):
        sign_release(package.path, keys[0], time.time(), 0)
    assert signature_paths(Path("/x/pkg.tar")) == (Path("/x/pkg.tar.sig"), Path("/x/pkg.tar.targets.json"))


def test_a_sealed_package_is_checked_against_the_hashes_of_its_plaintext(
    package: Package, keys: tuple[Path, Path]
) -> None:
    """On a node that stores packages encrypted, the files on disk are ciphertext: the agent hashes each file's
    plaintext in memory while sealing it, and model-signing compares those hashes with the signed list."""
    signed = sign_release(package.path, keys[0], time.time(), 86400)
    manifest = read_manifest(package.path)
    plain = {entry.path: entry.sha256 for entry in manifest.files}
    for entry in manifest.files:  # what a sealed store holds: not the bytes that were signed
        (package.path / entry.path).write_bytes(b"SENC1" + b"\0" * 64)
    with pytest.raises(SignatureError):
        verify_package_signature(package.path, signed.bundle, [keys[1].read_bytes()], package.digest)
    hint = verify_package_signature(package.path, signed.bundle, [keys[1].read_bytes()], package.digest, hashes=plain)
    assert hint == key_hint(keys[1].read_bytes())

    # a plaintext that hashed otherwise (changed before sealing) is refused, as is a file left out or added
    model = manifest.model_file
    trusted = [keys[1].read_bytes()]
    for hashes in (
        {**plain, model: "0" * 64},
        {**plain, "extra.bin": "0" * 64},
        {k: v for k, v in plain.items() if k != model},
    ):
        with pytest.raises(SignatureError):
            verify_package_signature(package.path, signed.bundle, trusted, package.digest, hashes=hashes)
