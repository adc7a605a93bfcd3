"""The model registry: package uploads, and the models, versions and variants they register.

An upload is streamed into a temporary file while hashed, unpacked and verified whole with the core package
reader, then stored as a blob under the tar's sha256 and registered. The same variant with the same package
digest again is a no-op; with another digest it is a conflict (a variant id names one build forever).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from strata.control.blobs import BlobStore, StagedBlob
from strata.control.db import Database, Model, ModelVersion, Variant
from strata.control.errors import PayloadTooLarge, StoreError, disk_error
from strata.control.feed import ChangeFeed
from strata.control.lease import serialize
from strata.control.supply import CheckedSignature, SupplyService
from strata.core.chunking import offsets
from strata.core.errors import Conflict, NotFound, PackageError
from strata.core.hashing import canonical_json
from strata.core.package import Manifest, Package, load_golden, unpack_tar
from strata.core.policy import Policy, compile_rules
from strata.core.profiles import get_profile
from strata.core.telemetry import TelemetryError, drift_references
from strata.trust.release import SignedRelease


@dataclass(frozen=True)
class AddedPackage:
    """The outcome of an upload: which variant it is, where its tar is stored, and whether it was new."""

    model: str
    version: str
    variant: str
    digest: str
    blob: str
    size: int
    created: bool
    signature: str | None = None


@dataclass(frozen=True)
class VariantInfo:
    """A registered variant: its build facts, package digest, tar blob, metrics and signature."""

    id: str
    profile: str
    runtime: str
    precision: str
    digest: str
    blob: str
    size: int
    metrics: dict[str, Any]
    created_at: float
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    signature: str | None = None


@dataclass(frozen=True)
class VersionInfo:
    """A version of a model with its variants, sorted by id."""

    version: str
    created_at: float
    variants: tuple[VariantInfo, ...]


@dataclass(frozen=True)
class ModelInfo:
    """A model with its versions, oldest first."""

    name: str
    created_at: float
    versions: tuple[VersionInfo, ...]


def _check_drift(manifest: Manifest) -> None:
    """The manifest's drift references are what nodes can use: every node counts each bin of them at every
    inference, so a reference with a million bins is refused here, not served; and a node finds a reference's
    values by its tensor's name among the batch's inputs or outputs (its kind), so one naming a tensor the model
    does not have would be served and never counted.

    Raises:
        PackageError: a reference is malformed or has more than DRIFT_BINS bins (see `DriftReference.from_json`),
            two name one tensor, or one names an input or output the manifest's signature lacks.
    """
    try:
        references = drift_references(manifest.drift)
    except TelemetryError as exc:
        raise PackageError(f"the package's drift section is not valid: {exc}") from exc
    signature = {"input": {t.name for t in manifest.inputs}, "output": {t.name for t in manifest.outputs}}
    for reference in references:
        if reference.tensor not in signature[reference.kind]:
            raise PackageError(
                f"the package's drift section refers to {reference.kind} {reference.tensor[:64]!r}, which the model "
                f"does not have (its {reference.kind}s: {', '.join(sorted(signature[reference.kind]))[:256]})"
            )


def _variant_info(row: Variant) -> VariantInfo:
    return VariantInfo(
        id=row.variant,
        profile=row.profile,
        runtime=row.runtime,
        precision=row.precision,
        digest=row.digest,
        blob=row.blob,
        size=row.size,
        metrics=dict(row.metrics),
        created_at=row.created_at,
        inputs=list(row.manifest.get("inputs", [])),
        outputs=list(row.manifest.get("outputs", [])),
        signature=row.signature,
    )


def _version_info(row: ModelVersion) -> VersionInfo:
    return VersionInfo(
        version=row.version,
        created_at=row.created_at,
        variants=tuple(_variant_info(v) for v in row.variants),
    )


def _model_info(row: Model) -> ModelInfo:
    return ModelInfo(name=row.name, created_at=row.created_at, versions=tuple(_version_info(v) for v in row.versions))


_WITH_VARIANTS = selectinload(Model.versions).selectinload(ModelVersion.variants)


class RegistryService:
    """Registers uploaded packages and answers what models, versions and variants exist."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        feed: ChangeFeed,
        clock: Callable[[], float],
        tmp_dir: Path,
        max_package_bytes: int,
        supply: SupplyService | None = None,
    ) -> None:
        """`supply` checks release signatures on upload (None: no checks, for tests of the registry alone)."""
        self._db = db
        self._supply = supply
        self._blobs = blobs
        self._feed = feed
        self._clock = clock
        self._tmp_dir = tmp_dir
        self._max_package_bytes = max_package_bytes
        # One registration at a time in this process; the unique constraints guard against other processes.
        self._register_lock = threading.Lock()

    def add_package(
        self, chunks: Iterable[bytes], declared_size: int | None = None, signature: SignedRelease | None = None
    ) -> AddedPackage:
        """Receive a package tar, verify it whole (and its release signature), store it as a blob and register its
        variant; a checked signature is stored with it.

        Args:
            chunks: the tar's bytes, in pieces; consumed once.
            declared_size: the size the sender announced (Content-Length), refused early when too large.
            signature: the package's release signature, required when the server has release keys.

        Raises:
            PayloadTooLarge: the tar is larger than `max_package_bytes`.
            PackageError, VerificationError: the tar is not a valid package, or its files do not match.
            SignatureError: the signature is missing (release keys configured), or not by a release key, or not
                over this package.
            MetadataError: the release role is malformed or expired.
            ProfileError: the package names an unknown hardware profile.
            PackageError: also when its drift references are malformed or have too many bins.
            PolicyError: the package's placement policy does not parse, or a rule is not valid CEL.
            Conflict: this variant id is registered with another package digest.
            StoreError: the database or the blob store failed.
        """
        if declared_size is not None and declared_size > self._max_package_bytes:
            raise PayloadTooLarge(f"the package is larger than the {self._max_package_bytes} bytes this server accepts")
        with self._blobs.stage(chunks, self._max_package_bytes) as staged:
            manifest, checked = self._verify(staged, signature)
            get_profile(manifest.profile)
            compile_rules(Policy.from_json(manifest.policy))
            with self._register_lock:
                added = self._register(manifest, staged)
        if checked is not None and self._supply is not None:
            # After the variant row: a crash between the two leaves an unsigned variant, and uploading the same
            # signed package again stores its signature.
            info = self._supply.record(manifest.name, manifest.version, manifest.variant, checked)
            added = replace(added, signature=info.signature)
        if added.created:
            self._feed.bump()
        return added

    def _verify(self, staged: StagedBlob, signature: SignedRelease | None) -> tuple[Manifest, CheckedSignature | None]:
        """Unpack and verify the tar (and its release signature), then store what nodes fetch piece by piece: the
        canonical manifest (its blob id is the package digest), every chunk of the large files and every small
        file whole."""
        supply = self._supply

        def early(manifest: Manifest) -> None:
            _check_drift(manifest)
            if supply is not None:
                supply.check_upload_manifest(manifest, signature)

        try:
            with tempfile.TemporaryDirectory(dir=self._tmp_dir, prefix=".unpack.") as work:
                # The release role is checked on the manifest alone, before any other file is written; the sizes
                # the manifest lists bound what is written (see `unpack_tar`).
                package = unpack_tar(
                    staged.path, Path(work) / "package", max_bytes=self._max_package_bytes, check_manifest=early
                )
                checked = self._supply.check_upload(package, signature) if self._supply is not None else None
                # A golden file every node would refuse (deflated, unlisted arrays, inputs off the signature) is
                # refused here, with the reason, instead of failing every node's health check after a rollout.
                load_golden(package)
                self._store_pieces(package)
                return package.manifest, checked
        except OSError as exc:
            raise disk_error(f"cannot unpack the package for verification: {exc}", exc) from exc

    def _store_pieces(self, package: Package) -> None:
        manifest = package.manifest
        self._put_if_missing(manifest.digest.removeprefix("sha256:"), canonical_json(manifest.to_json()))
        for entry in manifest.files:
            data = (package.path / entry.path).read_bytes()
            if not entry.chunks:
                self._put_if_missing(entry.sha256, data)
                continue
            for offset, chunk in offsets(entry.chunks):
                self._put_if_missing(chunk.sha256, data[offset : offset + chunk.size])

    def _put_if_missing(self, sha256: str, data: bytes) -> None:
        if not self._blobs.exists(sha256):
            stored = self._blobs.put([data])
            if stored.sha256 != sha256:  # unpack_tar verified the files, so only a bug gets here
                raise StoreError(f"piece stored as {stored.sha256}, expected {sha256}")

    def _register(self, manifest: Manifest, staged: StagedBlob) -> AddedPackage:
        with self._db.transaction() as session:
            # Two uploads of one model at once (on one replica or two, as CI jobs pushing each profile's variant
            # do): both would add the model or version row, and the second failed with 409 "reload and try again".
            # One at a time, the second finds the rows (or its own package) there.
            serialize(session, f"registry:{manifest.name}")
            existing = session.scalar(
                select(Variant)
                .join(ModelVersion)
                .join(Model)
                .where(
                    Model.name == manifest.name,
                    ModelVersion.version == manifest.version,
                    Variant.variant == manifest.variant,
                )
            )
            if existing is not None:
                if existing.digest != manifest.digest:
                    raise Conflict(
                        f"{manifest.name} {manifest.version} already has a variant {manifest.variant} with digest "
                        f"{existing.digest}; this package is {manifest.digest}. Upload it under a new version."
                    )
                return AddedPackage(
                    manifest.name,
                    manifest.version,
                    manifest.variant,
                    existing.digest,
                    existing.blob,
                    existing.size,
                    False,
                )
            now = self._clock()
            version = self._version_row(session, manifest, now)
            # The blob goes in first: a crash after it leaves an unreferenced blob, never a row without its blob.
            blob = self._blobs.commit(staged)
            session.add(
                Variant(
                    version=version,
                    variant=manifest.variant,
                    profile=manifest.profile,
                    runtime=manifest.runtime,
                    precision=manifest.precision,
                    digest=manifest.digest,
                    blob=blob.sha256,
                    size=blob.size,
                    metrics=dict(manifest.metrics),
                    manifest=manifest.to_json(),
                    created_at=now,
                )
            )
        return AddedPackage(
            manifest.name, manifest.version, manifest.variant, manifest.digest, blob.sha256, blob.size, True
        )

    @staticmethod
    def _version_row(session: Session, manifest: Manifest, now: float) -> ModelVersion:
        model = session.scalar(select(Model).where(Model.name == manifest.name))
        if model is None:
            model = Model(name=manifest.name, created_at=now)
            session.add(model)
        version = session.scalar(
            select(ModelVersion).where(ModelVersion.model == model, ModelVersion.version == manifest.version)
        )
        if version is None:
            version = ModelVersion(model=model, version=manifest.version, created_at=now)
            session.add(version)
        return version

    def list_models(self) -> list[ModelInfo]:
        """Every model with its versions and variants, by name.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.scalars(select(Model).options(_WITH_VARIANTS).order_by(Model.name)).all()
            return [_model_info(row) for row in rows]

    def get_model(self, name: str) -> ModelInfo:
        """One model with its versions and variants.

        Raises:
            NotFound: no such model.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            return _model_info(self._model_row(session, name))

    def get_version(self, name: str, version: str) -> VersionInfo:
        """One version of a model with its variants.

        Raises:
            NotFound: no such model, or no such version of it.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            model = self._model_row(session, name)
            for row in model.versions:
                if row.version == version:
                    return _version_info(row)
        raise NotFound(f"model {name!r} has no version {version!r}")

    @staticmethod
    def _model_row(session: Session, name: str) -> Model:
        row = session.scalar(select(Model).options(_WITH_VARIANTS).where(Model.name == name))
        if row is None:
            raise NotFound(f"no model {name!r}")
        return row
