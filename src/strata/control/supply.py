"""The control plane's supply chain: release keys, signed uploads, and the TUF image and director repositories.

The server is told the release public keys (`strata server --release-key PUB.pem`, repeatable). With them, an
upload must carry the package's release signature (a model-signing bundle) and its release-signed TUF role (see
`strata.trust.tuf_repo` for the roles); both are checked against the release keys before anything is stored, and
an operator can attach them to a variant uploaded earlier. Without release keys the server is in development
mode: it accepts unsigned packages and hands nodes no keys, so they accept unsigned packages too.

The online TUF keys (targets, snapshot and timestamp of both repositories) and the root keys live in
`DATA/tuf/keys/*.pem` (mode 0600), made on first start; the roots are signed once. Metadata versions are rows of
`tuf_metadata` and only ever grow, so a server restart never serves an older version than a node has seen (a
server restored from an older database does, and its nodes refuse it: that is the point). The image repository is
re-published when a signature is stored; each node's director metadata when its desired state changed since the
last fetch; online metadata when less than half its lifetime is left, at the moment a node asks for it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from securesystemslib.signer import CryptoSigner, SSlibKey
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from strata.control.blobs import BlobStore
from strata.control.db import Database, Model, ModelVersion, TufMetadata, Variant
from strata.control.errors import StoreError, disk_error
from strata.control.feed import ChangeFeed
from strata.control.fleet import DesiredDocument
from strata.control.lease import serialize
from strata.core.errors import UNSIGNED_REFUSED, ConfigError, Conflict, NotFound, SignatureError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json
from strata.core.package import Manifest, Package, unpack_tar
from strata.core.wire import EnrollResponse
from strata.trust.expiry import Expiries
from strata.trust.release import SignedRelease
from strata.trust.signing import (
    bundle_id,
    canonicalize_manifest,
    load_public_key,
    verify_package_signature,
)
from strata.trust.targets import TargetFacts, facts_of_manifest, target_path
from strata.trust.tuf_repo import (
    TOP_ROLES,
    Delegation,
    ReleaseRole,
    build_director_targets,
    build_image_targets,
    build_root,
    build_snapshot,
    build_timestamp,
    check_release_role,
    expires_at,
    load_signer,
    needs_refresh,
    new_signer,
    parse,
    release_key,
    signer_pem,
)

log = logging.getLogger(__name__)

IMAGE: Final = "image"
DIRECTOR: Final = "director"
# The name of the lock (`lease.serialize`) that replicas take before publishing in the image repository.
_IMAGE_LOCK: Final = "tuf:image"
# Versions of a role kept besides the newest: a node that read the previous snapshot can still fetch what it names.
KEEP_VERSIONS: Final = 3
_VERSIONED = re.compile(r"\A([1-9][0-9]{0,18})\.(.+)\.json\Z")


@dataclass(frozen=True)
class CheckedSignature:
    """A release signature checked against a package: its bundle, its role and the key hint that signed it."""

    bundle: bytes
    role: ReleaseRole
    key_hint: str


@dataclass(frozen=True)
class SignatureInfo:
    """A stored release signature: which variant, package and bundle blob, which key, until when."""

    model: str
    version: str
    variant: str
    digest: str
    signature: str
    key: str
    role_version: int
    expires_at: float


@dataclass(frozen=True)
class PackageRole:
    """A package's release-signed TUF role as the image repository holds it."""

    name: str
    version: int
    expires_at: float
    delegated: bool


def read_release_keys(paths: Sequence[Path]) -> tuple[str, ...]:
    """The PEM texts of the release public keys at `paths` (`strata server --release-key`), each checked, without
    repeats.

    Raises:
        ConfigError: a file is unreadable, holds a private key (the model owner's, which stays offline), or holds
            no elliptic-curve public key.
    """
    pems = []
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--release-key {path}: {exc}") from exc
        if "PRIVATE KEY-----" in text:
            raise ConfigError(
                f"--release-key {path} is a private key: give the server the public half (the .pub file `strata "
                "keys create` wrote beside it); the private key stays with the model owner, offline"
            )
        try:
            load_public_key(text)
        except SignatureError as exc:
            raise ConfigError(f"--release-key {path}: {exc}") from exc
        pems.append(text)
    return tuple(dict.fromkeys(pems))


def _role_key_names() -> tuple[str, ...]:
    return tuple(f"{repo}-{role}" for repo in (IMAGE, DIRECTOR) for role in TOP_ROLES)


class SupplyService:
    """Release keys, signature checks, and the TUF metadata both repositories serve (see the module docstring)."""

    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        feed: ChangeFeed,
        desired: Callable[[str], DesiredDocument],
        clock: Callable[[], float],
        keys_dir: Path,
        tmp_dir: Path,
        release_keys: Sequence[Path] = (),
        expiries: Expiries | None = None,
    ) -> None:
        self._db = db
        self._blobs = blobs
        self._feed = feed
        self._desired = desired
        self._clock = clock
        self._keys_dir = keys_dir
        self._tmp_dir = tmp_dir
        self._release_key_paths = tuple(release_keys)
        self.expiries = expiries or Expiries()
        self._release_pems: tuple[str, ...] = ()
        self._release_keys: dict[str, SSlibKey] = {}
        self._signers: dict[str, CryptoSigner] = {}
        self._roots: dict[str, bytes] = {}
        self._lengths: dict[str, int] = {}
        self._lock = threading.Lock()

    # --- start-up ---------------------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """True when the server has release keys: signatures are required and nodes pin the keys."""
        return bool(self._release_pems)

    @property
    def release_keys(self) -> tuple[str, ...]:
        """The release public keys, as PEM text."""
        return self._release_pems

    def start(self) -> None:
        """Read the release keys, load (or make, on first start) the TUF role keys, and sign both roots once.

        Raises:
            ConfigError: a release key is unreadable or not an EC public key, a role key file is unusable, or the
                role keys do not match the roots stored in the database (keys from another server).
            StoreError: the database or the key folder failed.
        """
        self._release_pems = read_release_keys(self._release_key_paths)
        self._release_keys = {key.keyid: key for key in (release_key(pem) for pem in self._release_pems)}
        self._signers = {name: self._role_signer(name) for name in _role_key_names()}
        now = self._clock()
        with self._lock, self._db.transaction() as session:
            for repo in (IMAGE, DIRECTOR):
                self._roots[repo] = self._ensure_root(session, repo, now)
        if self.enabled:
            log.info(
                "release signatures required: %d release key(s); TUF keys in %s",
                len(self._release_pems),
                self._keys_dir,
            )
        else:
            log.warning("no --release-key given: this server accepts UNSIGNED packages (development mode)")

    def _role_signer(self, name: str) -> CryptoSigner:
        path = self._keys_dir / f"{name}.pem"
        try:
            if path.exists():
                return load_signer(path.read_bytes())
            self._keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            signer = new_signer()
            write_bytes_atomic(path, signer_pem(signer), mode=0o600)
            return signer
        except OSError as exc:
            raise StoreError(f"cannot read or write the TUF key {path}: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"TUF key {path}: {exc}") from exc

    def _ensure_root(self, session: Session, repo: str, now: float) -> bytes:
        keys = {role: self._signers[f"{repo}-{role}"].public_key for role in TOP_ROLES}
        stored = _latest(session, repo, "root")
        if stored is None:
            body = build_root(keys, self._signers[f"{repo}-root"], now, self.expiries)
            _insert(session, repo, "root", 1, body, now)
            return body
        root = parse(stored.body.encode()).signed
        for role in TOP_ROLES:
            if root.roles[role].keyids != [keys[role].keyid]:
                raise ConfigError(
                    f"the TUF {role} key of the {repo} repository in {self._keys_dir} is not the one its stored root "
                    "names: restore the keys of this database's server"
                )
        return stored.body.encode()

    def enrollment_answer(self, response: EnrollResponse) -> EnrollResponse:
        """An enrollment answer with the trust the node pins: the release keys and both roots (none in development)."""
        if not self.enabled:
            return response
        roots = {repo: body.decode() for repo, body in self._roots.items()}
        return dataclasses.replace(response, release_keys=self._release_pems, tuf_roots=roots)

    # --- signatures ---------------------------------------------------------------------------------------------

    def check_upload_manifest(self, manifest: Manifest, signature: SignedRelease | None) -> None:
        """The early half of an upload's signature check, on its manifest alone (before any other file of the tar
        is written): a signature is there when the server requires one, and its release role is by a release key
        and for this manifest's digest and length.

        Raises:
            SignatureError, MetadataError: as `check_upload`.
        """
        if self._required(signature) is None or signature is None:
            return
        check_release_role(signature.release_role, self._release_pems, self._clock(), self._expected(manifest))

    def check_upload(self, package: Package, signature: SignedRelease | None) -> CheckedSignature | None:
        """Check an uploaded package's release signature (in the upload's unpack folder).

        Raises:
            SignatureError: release keys are configured and the package is unsigned, or its bundle or role is not
                by a release key or not for this package; or a signature came and the server has no release keys.
            MetadataError: the release role is malformed or expired.
            StoreError: the unpacked manifest cannot be rewritten.
        """
        checked = self._required(signature)
        return None if checked is None else self._check(package.path, checked)

    def _required(self, signature: SignedRelease | None) -> SignedRelease | None:
        """The signature to check, or None when there is none and none is needed.

        Raises:
            SignatureError: release keys are configured and there is no signature, or one came and there are none.
        """
        if signature is None:
            if self.enabled:
                raise SignatureError(UNSIGNED_REFUSED)
            return None
        if not self.enabled:
            raise SignatureError("this server has no release keys (strata server --release-key PUB.pem) to check with")
        return signature

    @staticmethod
    def _expected(manifest: Manifest) -> TargetFacts:
        canonical = canonical_json(manifest.to_json())
        return facts_of_manifest(manifest.to_json(), len(canonical), manifest.digest.removeprefix("sha256:"))

    def _check(self, folder: Path, signature: SignedRelease) -> CheckedSignature:
        try:
            manifest = canonicalize_manifest(folder)
        except OSError as exc:
            raise disk_error(f"cannot prepare the package for its signature check: {exc}", exc) from exc
        role = check_release_role(signature.release_role, self._release_pems, self._clock(), self._expected(manifest))
        hint = verify_package_signature(folder, signature.bundle, self._release_pems, manifest.digest)
        return CheckedSignature(signature.bundle, role, hint)

    def attach(self, model: str, version: str, variant: str, signature: SignedRelease) -> SignatureInfo:
        """Check a release signature against a registered variant's package and store it.

        Raises:
            NotFound: no such variant.
            SignatureError, MetadataError: as `check_upload`.
            Conflict: a newer release role of this package is stored.
            StoreError: the database or the blob store failed.
        """
        if not self.enabled:
            raise SignatureError("this server has no release keys (strata server --release-key PUB.pem) to check with")
        blob = self._variant_blob(model, version, variant)
        try:
            with tempfile.TemporaryDirectory(dir=self._tmp_dir, prefix=".signature.") as work:
                package = unpack_tar(self._blobs.path(blob), Path(work) / "package")
                checked = self._check(package.path, signature)
        except OSError as exc:
            raise disk_error(f"cannot unpack the package to check its signature: {exc}", exc) from exc
        return self.record(model, version, variant, checked)

    def _variant_blob(self, model: str, version: str, variant: str) -> str:
        with self._db.transaction() as session:
            blob = session.scalar(
                select(Variant.blob)
                .join(ModelVersion)
                .join(Model)
                .where(Model.name == model, ModelVersion.version == version, Variant.variant == variant)
            )
        if blob is None:
            raise NotFound(f"no variant {variant!r} of {model} {version}")
        return blob

    def record(self, model: str, version: str, variant: str, checked: CheckedSignature) -> SignatureInfo:
        """Store a checked signature for a registered variant and publish it in the image repository.

        Raises:
            NotFound: no such variant.
            Conflict: the signature is for another package, or a newer release role of it is stored.
            StoreError: the database or the blob store failed.
        """
        role = checked.role
        name = target_path(model, version, variant)
        if role.name != name:
            raise Conflict(f"the release role is for {role.name}, not {name}")
        blob = self._blobs.put([checked.bundle])
        if blob.sha256 != bundle_id(checked.bundle):
            raise StoreError("the signature was stored under another hash")  # only a bug gets here
        now = self._clock()
        with self._lock, self._db.transaction() as session:
            serialize(session, _IMAGE_LOCK)
            row = session.scalar(
                select(Variant)
                .join(ModelVersion)
                .join(Model)
                .where(Model.name == model, ModelVersion.version == version, Variant.variant == variant)
            )
            if row is None:
                raise NotFound(f"no variant {variant!r} of {model} {version}")
            if row.digest != role.target.digest:
                raise Conflict(f"the signature is for package {role.target.digest}; {name} is {row.digest}")
            stored = _latest(session, IMAGE, name)
            if stored is not None and stored.version > role.version:
                raise Conflict(f"a newer release role of {name} is stored (version {stored.version})")
            if stored is not None and stored.version == role.version and stored.body.encode() != role.body:
                raise Conflict(f"another release role of {name} with version {role.version} is stored")
            row.signature = blob.sha256
            if stored is None or stored.version < role.version:
                _insert(session, IMAGE, name, role.version, role.body, now, source=role.keyid)
                self._publish_image(session, now)
        self._feed.bump()
        return SignatureInfo(
            model, version, variant, role.target.digest, blob.sha256, role.keyid, role.version, role.expires_at
        )

    def package_roles(self) -> dict[str, PackageRole]:
        """The release-signed role of every package the image repository holds (newest version of each), by
        role name (`target_path` of the package); `delegated` says whether the image targets still delegate to
        it (its release key is one this server trusts).

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            roles = self._package_roles(session)
            return {
                name: PackageRole(name, row.version, row.expires_at, row.source in self._release_keys)
                for name, row in roles.items()
            }

    # --- the image repository ---------------------------------------------------------------------------------

    def _package_roles(self, session: Session) -> dict[str, TufMetadata]:
        newest = (
            select(TufMetadata.role, func.max(TufMetadata.version).label("version"))
            .where(TufMetadata.repo == IMAGE, TufMetadata.role.not_in(TOP_ROLES))
            .group_by(TufMetadata.role)
            .subquery()
        )
        rows = session.scalars(
            select(TufMetadata)
            .join(
                newest,
                (TufMetadata.role == newest.c.role) & (TufMetadata.version == newest.c.version),
            )
            .where(TufMetadata.repo == IMAGE)
        ).all()
        return {row.role: row for row in rows}

    def _publish_image(self, session: Session, now: float) -> bytes:
        """New image targets (a delegation per package whose release key is still trusted), snapshot and timestamp.

        The snapshot lists every package role ever published, delegated or not: a TUF client refuses a snapshot
        that drops a role it has seen (that would let a mirror hide a newer version of the role).
        """
        roles = self._package_roles(session)
        delegations = [
            Delegation(name, self._release_keys[str(row.source)])
            for name, row in roles.items()
            if row.source in self._release_keys
        ]
        targets_version = _next_version(session, IMAGE, "targets")
        targets = build_image_targets(delegations, targets_version, now, self.expiries, self._signers["image-targets"])
        _insert(session, IMAGE, "targets", targets_version, targets, now)
        listed = {"targets": (targets_version, targets)}
        listed.update({name: (row.version, row.body.encode()) for name, row in roles.items()})
        return self._publish_snapshot(session, IMAGE, IMAGE, listed, now)

    def _publish_snapshot(
        self, session: Session, repo: str, keys: str, roles: dict[str, tuple[int, bytes]], now: float
    ) -> bytes:
        snapshot_version = _next_version(session, repo, "snapshot")
        snapshot = build_snapshot(roles, snapshot_version, now, self.expiries, self._signers[f"{keys}-snapshot"])
        _insert(session, repo, "snapshot", snapshot_version, snapshot, now)
        return self._publish_timestamp(session, repo, keys, snapshot_version, snapshot, now)

    def _publish_timestamp(
        self, session: Session, repo: str, keys: str, snapshot_version: int, snapshot: bytes, now: float
    ) -> bytes:
        version = _next_version(session, repo, "timestamp")
        timestamp = build_timestamp(
            snapshot_version, snapshot, version, now, self.expiries, self._signers[f"{keys}-timestamp"]
        )
        _insert(session, repo, "timestamp", version, timestamp, now)
        _prune(session, repo)
        return timestamp

    def _image_timestamp(self) -> bytes:
        """The image repository's timestamp, published anew first when a role is missing or due for refresh.

        Reading is a plain transaction; publishing takes the image repository's lock across replicas first and
        decides again (another replica may have published meanwhile): versions are the newest stored plus one, so
        two replicas publishing at once would both write the same version and one would fail.
        """
        now = self._clock()
        with self._lock:
            with self._db.transaction() as session:
                current = self._image_step(session, now, publish=False)
            if current is not None:
                return current
            with self._db.transaction() as session:
                serialize(session, _IMAGE_LOCK)
                published = self._image_step(session, now, publish=True)
            assert published is not None  # publish=True always answers
            return published

    def _image_step(self, session: Session, now: float, *, publish: bool) -> bytes | None:
        """The current timestamp; or, when something is due, the new one if `publish`, else None."""
        targets = _latest(session, IMAGE, "targets")
        snapshot = _latest(session, IMAGE, "snapshot")
        timestamp = _latest(session, IMAGE, "timestamp")
        if targets is None or snapshot is None or timestamp is None or self._stale(targets, "targets", now):
            return self._publish_image(session, now) if publish else None
        if self._stale(snapshot, "snapshot", now):
            return self._publish_image(session, now) if publish else None
        if self._stale(timestamp, "timestamp", now):
            if not publish:
                return None
            return self._publish_timestamp(session, IMAGE, IMAGE, snapshot.version, snapshot.body.encode(), now)
        return timestamp.body.encode()

    def _stale(self, row: TufMetadata, role: str, now: float) -> bool:
        return needs_refresh(row.body.encode(), now, self.expiries.of(role))

    # --- the director repository --------------------------------------------------------------------------

    def _director_timestamp(self, node_id: str) -> bytes:
        document = self._desired(node_id)  # NotFound for an unknown node
        targets_facts = [
            TargetFacts(
                path=target_path(model.name, model.version, variant.id),
                length=self._manifest_length(variant.digest),
                sha256=variant.digest.removeprefix("sha256:"),
                name=model.name,
                version=model.version,
                variant=variant.id,
                profile=variant.profile,
                runtime=variant.runtime,
                precision=variant.precision,
            )
            for model in document.state.models
            for variant in model.variants
        ]
        repo = f"{DIRECTOR}/{node_id}"
        now = self._clock()
        # As `_image_timestamp`: read, and publish only under the repository's lock across replicas.
        with self._lock:
            with self._db.transaction() as session:
                current = self._director_step(session, repo, document.etag, targets_facts, now, publish=False)
            if current is not None:
                return current
            with self._db.transaction() as session:
                serialize(session, f"tuf:{repo}")
                published = self._director_step(session, repo, document.etag, targets_facts, now, publish=True)
            assert published is not None  # publish=True always answers
            return published

    def _director_step(
        self, session: Session, repo: str, etag: str, targets_facts: list[TargetFacts], now: float, *, publish: bool
    ) -> bytes | None:
        """The node's current director timestamp; or, when something is due, the new one if `publish`, else None."""
        targets = _latest(session, repo, "targets")
        snapshot = _latest(session, repo, "snapshot")
        timestamp = _latest(session, repo, "timestamp")
        if targets is None or targets.source != etag or self._stale(targets, "targets", now):
            if not publish:
                return None
            version = _next_version(session, repo, "targets")
            body = build_director_targets(targets_facts, version, now, self.expiries, self._signers["director-targets"])
            _insert(session, repo, "targets", version, body, now, source=etag)
            return self._publish_snapshot(session, repo, DIRECTOR, {"targets": (version, body)}, now)
        if snapshot is None or timestamp is None or self._stale(snapshot, "snapshot", now):
            if not publish:
                return None
            listed = {"targets": (targets.version, targets.body.encode())}
            return self._publish_snapshot(session, repo, DIRECTOR, listed, now)
        if self._stale(timestamp, "timestamp", now):
            if not publish:
                return None
            return self._publish_timestamp(session, repo, DIRECTOR, snapshot.version, snapshot.body.encode(), now)
        return timestamp.body.encode()

    def _manifest_length(self, digest: str) -> int:
        length = self._lengths.get(digest)
        if length is None:
            with self._db.transaction() as session:
                manifest = session.scalar(select(Variant.manifest).where(Variant.digest == digest).limit(1))
            if manifest is None:
                raise NotFound(f"no package {digest}")
            length = self._lengths[digest] = len(canonical_json(manifest))
        return length

    # --- serving ------------------------------------------------------------------------------------------------

    def metadata(self, filename: str, node_id: str | None = None) -> bytes:
        """A metadata file of the image repository (`node_id` None) or of a node's director repository, by the
        name python-tuf's client asks for: `timestamp.json`, `N.ROLE.json`, or `ROLE.json` (the newest).

        Raises:
            NotFound: no such file (or no such node).
            StoreError: the database failed.
        """
        repo = IMAGE if node_id is None else f"{DIRECTOR}/{node_id}"
        if filename == "timestamp.json":
            return self._image_timestamp() if node_id is None else self._director_timestamp(node_id)
        match = _VERSIONED.match(filename)
        role, version = (match.group(2), int(match.group(1))) if match else (filename.removesuffix(".json"), None)
        if not filename.endswith(".json") or not role:
            raise NotFound(f"no metadata {filename!r}")
        if role == "root":
            repo = IMAGE if node_id is None else DIRECTOR
        with self._db.transaction() as session:
            query = select(TufMetadata.body).where(TufMetadata.repo == repo, TufMetadata.role == role)
            if version is not None:
                body = session.scalar(query.where(TufMetadata.version == version))
            else:
                body = session.scalar(query.order_by(TufMetadata.version.desc()).limit(1))
        if body is None:
            raise NotFound(f"no metadata {filename!r}")
        return body.encode()


# --- rows -------------------------------------------------------------------------------------------------------


def _latest(session: Session, repo: str, role: str) -> TufMetadata | None:
    return session.scalar(
        select(TufMetadata)
        .where(TufMetadata.repo == repo, TufMetadata.role == role)
        .order_by(TufMetadata.version.desc())
        .limit(1)
    )


def _next_version(session: Session, repo: str, role: str) -> int:
    current = session.scalar(
        select(func.max(TufMetadata.version)).where(TufMetadata.repo == repo, TufMetadata.role == role)
    )
    return int(current or 0) + 1


def _insert(
    session: Session, repo: str, role: str, version: int, body: bytes, now: float, source: str | None = None
) -> None:
    session.add(
        TufMetadata(
            repo=repo,
            role=role,
            version=version,
            body=body.decode(),
            expires_at=expires_at(body),
            source=source,
            created_at=now,
        )
    )
    session.flush()


def _prune(session: Session, repo: str) -> None:
    """Drop all but the newest `KEEP_VERSIONS` + 1 versions of each online role (roots are kept for good)."""
    for role in ("targets", "snapshot", "timestamp"):
        newest = session.scalar(
            select(func.max(TufMetadata.version)).where(TufMetadata.repo == repo, TufMetadata.role == role)
        )
        if newest is not None and newest > KEEP_VERSIONS + 1:
            session.execute(
                delete(TufMetadata).where(
                    TufMetadata.repo == repo, TufMetadata.role == role, TufMetadata.version < newest - KEEP_VERSIONS
                )
            )
