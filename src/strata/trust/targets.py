"""What a TUF target says about a package, and the node's decisions over it: pure, no I/O, no crypto imports.

Both TUF repositories of strata name one target per package, at `MODEL/VERSION/VARIANT`. Its hashes are the
package digest (the sha256 of the canonical manifest), its length the canonical manifest's length, and its
`custom` field the package's facts (name, version, variant, profile, runtime, precision). The image repository's
target says what exists (its per-package role is signed by a release key); the director's says what this node
should run. Before a node trusts a desired package it checks, with the functions here, that the two agree, that
the desired state names the same package, and that its own profile can run the package's.

The agent imports this module in its long-running process, so it must stay free of cryptography and tuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from strata.core.errors import MetadataError, ProfileError
from strata.core.hashing import is_hex_sha256
from strata.core.profiles import Profile, can_run, get_profile

CUSTOM_FIELDS: Final = ("name", "version", "variant", "profile", "runtime", "precision")


def target_path(model: str, version: str, variant: str) -> str:
    """The TUF target path (and, in the image repository, the per-package role name) of a package.

    Names, versions and variant ids are checked names ([A-Za-z0-9._-], see `core.package.check_name`), so the
    path is unambiguous and contains no glob characters.
    """
    return f"{model}/{version}/{variant}"


@dataclass(frozen=True)
class TargetFacts:
    """One target as a repository describes it: path, length and sha256 of the canonical manifest, and the
    package facts from its `custom` field."""

    path: str
    length: int
    sha256: str
    name: str
    version: str
    variant: str
    profile: str
    runtime: str
    precision: str

    @property
    def digest(self) -> str:
        """The package digest this target pins (`sha256:<hex>`)."""
        return "sha256:" + self.sha256

    def custom(self) -> dict[str, str]:
        return {key: str(getattr(self, key)) for key in CUSTOM_FIELDS}

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "length": self.length, "sha256": self.sha256, **self.custom()}

    @classmethod
    def from_json(cls, raw: Any) -> TargetFacts:
        """Raises:
        MetadataError: a field is missing or has the wrong type.
        """
        if not isinstance(raw, Mapping):
            raise MetadataError("target facts must be an object")
        return cls.parse(raw.get("path"), raw.get("length"), {"sha256": raw.get("sha256")}, raw)

    @classmethod
    def parse(cls, path: Any, length: Any, hashes: Any, custom: Any) -> TargetFacts:
        """Read a TUF target's path, length, hashes and custom field.

        Raises:
            MetadataError: the target has no sha256, a malformed length, or lacks a package fact.
        """
        if not isinstance(path, str) or not path:
            raise MetadataError(f"target path {path!r} is malformed")
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise MetadataError(f"target {path} has a malformed length {length!r}")
        sha = hashes.get("sha256") if isinstance(hashes, Mapping) else None
        if not isinstance(sha, str) or not is_hex_sha256(sha):
            raise MetadataError(f"target {path} has no sha256 hash")
        if not isinstance(custom, Mapping):
            raise MetadataError(f"target {path} has no custom package facts")
        values = {key: custom.get(key) for key in CUSTOM_FIELDS}
        missing = sorted(key for key, value in values.items() if not isinstance(value, str) or not value)
        if missing:
            raise MetadataError(f"target {path} lacks the package facts {missing}")
        return cls(path=path, length=length, sha256=sha, **{key: str(value) for key, value in values.items()})


def facts_of_manifest(manifest_json: Mapping[str, Any], length: int, sha256: str) -> TargetFacts:
    """The target a package's canonical manifest (`length` bytes, hashing to `sha256`) should have.

    Raises:
        MetadataError: the manifest lacks a package fact.
    """
    path = target_path(
        str(manifest_json.get("name")), str(manifest_json.get("version")), str(manifest_json.get("variant"))
    )
    return TargetFacts.parse(path, length, {"sha256": sha256}, manifest_json)


def check_agreement(image: TargetFacts, director: TargetFacts) -> None:
    """The director (what this node should run) and the image repository (what the release key says exists) must
    describe the same package: same path, hashes, length and facts.

    Raises:
        MetadataError: they differ; the message says in what.
    """
    differences = [
        f"{key}: director {getattr(director, key)!r}, image {getattr(image, key)!r}"
        for key in ("path", "sha256", "length", *CUSTOM_FIELDS)
        if getattr(director, key) != getattr(image, key)
    ]
    if differences:
        raise MetadataError(
            f"the director and image repositories disagree about {image.path}: " + "; ".join(differences)
        )


def check_desired(image: TargetFacts, model: str, version: str, variant: Mapping[str, Any]) -> None:
    """The desired state's variant must be the package the image repository vouches for.

    `variant` is a desired state's variant (`VariantRef.to_json()`).

    Raises:
        MetadataError: another digest, variant, profile, runtime or precision than the signed target says.
    """
    claimed = {
        "name": model,
        "version": version,
        "variant": variant.get("id"),
        "profile": variant.get("profile"),
        "runtime": variant.get("runtime"),
        "precision": variant.get("precision"),
    }
    differences = [
        f"{key} {claimed[key]!r} (signed: {getattr(image, key)!r})"
        for key in claimed
        if claimed[key] != getattr(image, key)
    ]
    if variant.get("digest") != image.digest:
        differences.append(f"digest {variant.get('digest')} (signed: {image.digest})")
    if differences:
        raise MetadataError(f"the desired state's {image.path} is not the signed package: " + "; ".join(differences))


def check_profile(image: TargetFacts, node: Profile, runtimes: frozenset[str] | None = None) -> None:
    """The package must be built for a profile this node can run (with a runtime it has, when `runtimes` is given).

    Raises:
        MetadataError: built for another architecture, ISA, accelerator or runtime than this node has.
    """
    try:
        built_for = get_profile(image.profile)
    except ProfileError as exc:
        raise MetadataError(f"{image.path} is built for an unknown profile: {exc}") from exc
    if not can_run(node, built_for, image.runtime):
        raise MetadataError(
            f"{image.path} is built for profile {image.profile} ({image.runtime}), which this node's profile "
            f"{node.id} cannot run"
        )
    if runtimes is not None and image.runtime not in runtimes:
        raise MetadataError(f"{image.path} needs the {image.runtime} runtime, which this node does not have")
