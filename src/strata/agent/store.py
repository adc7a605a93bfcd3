"""The node's artifact store: downloaded blobs, verified packages, and the slots state file.

Layout under the data folder:
    downloads/<blob>.part, downloads/<blob>   resumable downloads of package tars
    packages/<digest-hex>/                    extracted, verified packages (immutable once renamed in)
    packages/.staging-*                       extraction in progress (removed at start-up)
    state.json                                slots (active, previous) per model, and remembered failures

Activation is one atomic replace of state.json: a kill -9 at any instant leaves the old or the new slots.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from strata.core.errors import PackageError
from strata.core.fsutil import fsync_dir, remove_stale_temporaries, write_json_atomic
from strata.core.package import Package, unpack_tar, verify_package


@dataclass(frozen=True)
class SlotRef:
    """A package in a slot: which digest, which model version and variant, since when."""

    digest: str
    version: str
    variant: str
    activated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "version": self.version,
            "variant": self.variant,
            "activated_at": self.activated_at,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SlotRef:
        return cls(
            digest=str(raw["digest"]),
            version=str(raw["version"]),
            variant=str(raw["variant"]),
            activated_at=float(raw["activated_at"]),
        )


@dataclass(frozen=True)
class ModelSlots:
    active: SlotRef
    previous: SlotRef | None = None

    def to_json(self) -> dict[str, Any]:
        return {"active": self.active.to_json(), "previous": self.previous.to_json() if self.previous else None}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ModelSlots:
        previous = raw.get("previous")
        return cls(active=SlotRef.from_json(raw["active"]), previous=SlotRef.from_json(previous) if previous else None)


@dataclass(frozen=True)
class FailureRecord:
    """A target that failed (download, verification, load or health check), and when to try it again."""

    model: str
    version: str
    variant: str | None
    reason: str
    at: float
    attempts: int
    kind: str = "other"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "reason": self.reason,
            "at": self.at,
            "attempts": self.attempts,
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FailureRecord:
        variant = raw.get("variant")
        return cls(
            model=str(raw["model"]),
            version=str(raw["version"]),
            variant=str(variant) if variant is not None else None,
            reason=str(raw["reason"]),
            at=float(raw["at"]),
            attempts=int(raw["attempts"]),
            kind=str(raw.get("kind", "other")),
        )


@dataclass(frozen=True)
class ProbationRecord:
    """A fresh activation the node is still watching, and the latency it is judged against.

    Kept in state.json, so a restart during probation carries on (with counters from the restart on).
    """

    version: str
    digest: str
    started_at: float
    reference_p95_ms: float | None = None
    reference: str = "none"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "digest": self.digest,
            "started_at": self.started_at,
            "reference_p95_ms": self.reference_p95_ms,
            "reference": self.reference,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProbationRecord:
        reference = raw.get("reference_p95_ms")
        return cls(
            version=str(raw["version"]),
            digest=str(raw["digest"]),
            started_at=float(raw["started_at"]),
            reference_p95_ms=float(reference) if reference is not None else None,
            reference=str(raw.get("reference", "none")),
        )


@dataclass(frozen=True)
class NodeState:
    """What survives a restart: the slots of every model, the failures still remembered, and the activations
    still on probation."""

    models: Mapping[str, ModelSlots] = field(default_factory=dict)
    failures: Mapping[str, FailureRecord] = field(default_factory=dict)
    probation: Mapping[str, ProbationRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "models": {name: slots.to_json() for name, slots in sorted(self.models.items())},
            "failures": {key: record.to_json() for key, record in sorted(self.failures.items())},
            "probation": {name: record.to_json() for name, record in sorted(self.probation.items())},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> NodeState:
        return cls(
            models={name: ModelSlots.from_json(s) for name, s in raw.get("models", {}).items()},
            failures={key: FailureRecord.from_json(f) for key, f in raw.get("failures", {}).items()},
            probation={name: ProbationRecord.from_json(p) for name, p in raw.get("probation", {}).items()},
        )

    def with_active(self, model: str, slot: SlotRef) -> NodeState:
        """Slots after activating `slot`: the old active becomes previous (unless it is the same package)."""
        current = self.models.get(model)
        previous = current.active if current and current.active.digest != slot.digest else None
        if previous is None and current is not None:
            previous = current.previous
        models = {**self.models, model: ModelSlots(active=slot, previous=previous)}
        failures = {k: v for k, v in self.failures.items() if k != slot.digest}
        probation = {k: v for k, v in self.probation.items() if k != model}
        return replace(self, models=models, failures=failures, probation=probation)

    def without_model(self, model: str) -> NodeState:
        return replace(
            self,
            models={k: v for k, v in self.models.items() if k != model},
            probation={k: v for k, v in self.probation.items() if k != model},
        )

    def rolled_back(self, model: str) -> NodeState:
        """Slots after giving up the active package: the previous one is active again (and no longer previous).

        Raises:
            KeyError: the model has no previous slot to go back to.
        """
        slots = self.models[model]
        if slots.previous is None:
            raise KeyError(f"{model} has no previous slot")
        models = {**self.models, model: ModelSlots(active=slots.previous, previous=None)}
        return replace(self, models=models, probation={k: v for k, v in self.probation.items() if k != model})

    def with_probation(self, model: str, record: ProbationRecord) -> NodeState:
        return replace(self, probation={**self.probation, model: record})

    def without_probation(self, model: str) -> NodeState:
        return replace(self, probation={k: v for k, v in self.probation.items() if k != model})

    def with_failure(self, key: str, record: FailureRecord) -> NodeState:
        return replace(self, failures={**self.failures, key: record})

    def without_failures(self, keys: set[str]) -> NodeState:
        return replace(self, failures={k: v for k, v in self.failures.items() if k not in keys})


def digest_hex(digest: str) -> str:
    """`sha256:<hex>` -> `<hex>` (package folder names)."""
    return digest.split(":", 1)[1] if ":" in digest else digest


class ArtifactStore:
    """Files of the node's packages and slots (see the module docstring for the layout)."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.downloads = data_dir / "downloads"
        self.packages = data_dir / "packages"
        self.state_path = data_dir / "state.json"
        for folder in (self.downloads, self.packages):
            folder.mkdir(parents=True, exist_ok=True)

    # --- state ------------------------------------------------------------------------------------------

    def load_state(self) -> NodeState:
        """The stored slots; an unreadable state file is kept aside and an empty state returned."""
        try:
            raw = json.loads(self.state_path.read_text())
            return NodeState.from_json(raw)
        except FileNotFoundError:
            return NodeState()
        except (OSError, ValueError, KeyError, TypeError):
            # os.replace makes a torn write impossible; this is damage from outside. Keep it for a person.
            with contextlib.suppress(OSError):
                self.state_path.rename(self.state_path.with_suffix(".corrupt"))
            return NodeState()

    def save_state(self, state: NodeState) -> None:
        """Replace state.json atomically: the commit point of every activation."""
        write_json_atomic(self.state_path, state.to_json())

    # --- downloads --------------------------------------------------------------------------------------

    def blob_path(self, blob: str) -> Path:
        return self.downloads / blob

    def has_blob(self, blob: str) -> bool:
        return self.blob_path(blob).is_file()

    def downloaded_blobs(self) -> frozenset[str]:
        return frozenset(p.name for p in self.downloads.iterdir() if p.is_file() and "." not in p.name)

    # --- packages ---------------------------------------------------------------------------------------

    def package_dir(self, digest: str) -> Path:
        return self.packages / digest_hex(digest)

    def staged_digests(self) -> frozenset[str]:
        return frozenset(
            "sha256:" + p.name for p in self.packages.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def stage(self, blob: str, digest: str) -> Package:
        """Extract the downloaded tar of `blob` into packages/, verifying it against `digest` first.

        Raises:
            PackageError, VerificationError: the tar is not the package it claims to be (the blob is deleted).
        """
        target = self.package_dir(digest)
        if target.is_dir():
            return verify_package(target, digest)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.packages))
        try:
            package = unpack_tar(self.blob_path(blob), staging / "p", expected_digest=digest)
        except PackageError:
            shutil.rmtree(staging, ignore_errors=True)
            self.blob_path(blob).unlink(missing_ok=True)
            raise
        (staging / "p").rename(target)
        fsync_dir(self.packages)
        shutil.rmtree(staging, ignore_errors=True)
        self.blob_path(blob).unlink(missing_ok=True)
        return Package(path=target, manifest=package.manifest)

    def package(self, digest: str) -> Package:
        """A staged package, verified again (every file hashed) before it is trusted.

        Raises:
            PackageError, VerificationError: missing or changed on disk.
        """
        folder = self.package_dir(digest)
        if not folder.is_dir():
            raise PackageError(f"package {digest} is not on this node")
        return verify_package(folder, digest)

    def discard(self, digest: str) -> None:
        shutil.rmtree(self.package_dir(digest), ignore_errors=True)

    def clean_interrupted(self) -> None:
        """Remove what a killed process left half-done: staging folders and temporary files.

        Only safe while holding the data-folder lock (no other process is staging here).
        """
        for entry in self.packages.iterdir():
            if entry.name.startswith(".staging-"):
                shutil.rmtree(entry, ignore_errors=True)
        remove_stale_temporaries(self.root)
        remove_stale_temporaries(self.packages)

    def collect_garbage(self, keep: frozenset[str], keep_blobs: frozenset[str]) -> list[str]:
        """Delete packages not in `keep`, downloads not in `keep_blobs`, and leftovers of interrupted work."""
        removed = []
        for entry in self.packages.iterdir():
            if entry.name.startswith(".staging-"):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and "sha256:" + entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append("sha256:" + entry.name)
        for entry in self.downloads.iterdir():
            if entry.name.split(".", 1)[0] not in keep_blobs:
                entry.unlink(missing_ok=True)
        remove_stale_temporaries(self.root)
        return removed
