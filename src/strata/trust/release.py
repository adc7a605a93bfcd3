"""The model owner's offline signing step: a package's release signature and its release-signed TUF role.

`strata model sign PACKAGE --key release.key` (and `strata model push --sign-key`) write, beside the package:
    PACKAGE.sig            the OpenSSF model-signing bundle over the package folder (`model_signing verify` reads it)
    PACKAGE.targets.json   the package's role in the image TUF repository: one target (the canonical manifest, whose
                           sha256 is the package digest), signed by the same release key
Both are made from the package and the key alone, with no server and no earlier state, so signing can happen on an
offline machine; the server only adds the delegation, snapshot and timestamp (see `strata.trust.tuf_repo`).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from strata.core.errors import ConfigError, PackageError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json
from strata.core.package import read_manifest
from strata.core.wire import ProtocolError
from strata.trust.signing import BUNDLE_SUFFIX, MAX_BUNDLE_BYTES, read_bundle, sign_package
from strata.trust.targets import facts_of_manifest
from strata.trust.tuf_repo import load_signer, release_role

ROLE_SUFFIX: Final = ".targets.json"
MAX_ROLE_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class SignedRelease:
    """A package's release signature: the model-signing bundle and the release role, as bytes."""

    bundle: bytes
    release_role: bytes

    def write(self, package: Path) -> tuple[Path, Path]:
        """Write both beside `package` (a folder or a tar); return their paths.

        Raises:
            OSError: they cannot be written.
        """
        bundle_path, role_path = signature_paths(package)
        write_bytes_atomic(bundle_path, self.bundle)
        write_bytes_atomic(role_path, self.release_role)
        return bundle_path, role_path

    def to_base64(self) -> tuple[str, str]:
        """Both documents as base64 text, as they travel in upload headers and JSON bodies."""
        return base64.b64encode(self.bundle).decode(), base64.b64encode(self.release_role).decode()

    @classmethod
    def from_base64(cls, bundle: str, release_role: str) -> SignedRelease:
        """Decode what `to_base64` gave.

        Raises:
            ProtocolError: not base64, or larger than a release signature can be.
        """
        try:
            decoded = cls(base64.b64decode(bundle, validate=True), base64.b64decode(release_role, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ProtocolError(f"the signature is not base64: {exc}") from exc
        if len(decoded.bundle) > MAX_BUNDLE_BYTES or len(decoded.release_role) > MAX_ROLE_BYTES:
            raise ProtocolError("the signature is larger than a release signature can be")
        return decoded

    @classmethod
    def read(cls, package: Path) -> SignedRelease:
        """Read the signature files written beside `package`.

        Raises:
            ConfigError: one of them is missing or unreadable.
            SignatureError: the bundle is too large.
        """
        bundle_path, role_path = signature_paths(package)
        bundle = read_bundle(bundle_path)
        try:
            if role_path.stat().st_size > MAX_ROLE_BYTES:
                raise ConfigError(f"{role_path} is larger than a release role can be")
            role = role_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the release role {role_path}: {exc}") from exc
        return cls(bundle, role)


def signature_paths(package: Path) -> tuple[Path, Path]:
    """Where a package's bundle and release role live: beside it, never inside it."""
    base = package.parent / package.name.rstrip("/")
    return base.with_name(base.name + BUNDLE_SUFFIX), base.with_name(base.name + ROLE_SUFFIX)


def sign_release(folder: Path, key_path: Path, now: float, lifetime_s: float) -> SignedRelease:
    """Sign the package folder with the release key: its model-signing bundle and its release role.

    The folder's manifest is rewritten in canonical form first (same digest; see `strata.trust.signing`).

    Raises:
        ConfigError: the key cannot be read.
        PackageError: the folder is not a package.
        SignatureError: model-signing could not sign it.
    """
    if lifetime_s <= 0:
        raise ConfigError("a release signature must be valid for some time: give a positive --expires")
    bundle = sign_package(folder, key_path)
    try:
        canonical = (folder / "manifest.json").read_bytes()
    except OSError as exc:
        raise PackageError(f"cannot read the manifest of {folder}: {exc}") from exc
    manifest = read_manifest(folder)
    if canonical != canonical_json(manifest.to_json()):
        raise PackageError(f"the manifest of {folder} changed while it was signed")
    facts = facts_of_manifest(manifest.to_json(), len(canonical), manifest.digest.removeprefix("sha256:"))
    try:
        signer = load_signer(key_path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the release key {key_path}: {exc}") from exc
    return SignedRelease(bundle, release_role(facts, signer, now, lifetime_s))
