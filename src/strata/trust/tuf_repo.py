"""TUF metadata of strata's two repositories, built and checked as bytes with `tuf.api.metadata` (python-tuf).

Roles and keys (Uptane's split: an image repository says what exists, a director says what each node runs):

| repository | role | signed by (key file on the server, or who holds it) | expires |
| --- | --- | --- | --- |
| image | root | image root key (`tuf/keys/image-root.pem`; used once, keep it offline) | 10 years |
| image | targets | image targets key (online) | 30 days, re-signed by the server |
| image | `MODEL/VERSION/VARIANT` | a release key: the model owner's, offline (`strata model sign`) | 1 year |
| image | snapshot, timestamp | image snapshot / timestamp keys (online) | 7 days / 1 day, re-signed |
| director | root | director root key (`tuf/keys/director-root.pem`; used once) | 10 years |
| director | targets, snapshot, timestamp | director targets / snapshot / timestamp keys (online) | 30 / 7 / 1 days |

The image repository's top-level targets role holds no targets: it delegates each package path to the role of
the same name, signed by the release key that signed the package (terminating, exactly one path). That role holds
one target: the package's canonical manifest (hashes: the package digest; length: its byte length; `custom`: the
package facts). It is signed offline once per package and never needs server state, so signing stays an offline
step; its version is the signing time in seconds, so a re-signed role is always newer. The server only adds the
delegation, and snapshot and timestamp bind every role's current version. Nodes additionally check the package
role with the release keys they pinned at enrollment (`check_release_role`), so even a server whose online keys
are stolen cannot vouch for a package the release key did not sign.

The director repository is per node (`director/<node id>`), one root for all: its targets are the node's desired
packages, regenerated when the node's desired state changes.

Everything here is pure over bytes, keys and `now` (epoch seconds); the control plane stores and serves the
bytes, the agent's child process (`strata.trust.verify`) checks them with `tuf.ngclient.Updater`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.api.serialization.json import JSONSerializer

from strata.core.errors import ConfigError, MetadataError, SignatureError
from strata.trust.expiry import Expiries
from strata.trust.signing import load_public_key
from strata.trust.targets import TargetFacts

TOP_ROLES: Final = ("root", "targets", "snapshot", "timestamp")


# --- keys -----------------------------------------------------------------------------------------------------


def new_signer() -> CryptoSigner:
    """A fresh ECDSA P-256 signer for an online role."""
    return CryptoSigner.generate_ecdsa()


def signer_pem(signer: CryptoSigner) -> bytes:
    """The signer's private key as unencrypted PKCS#8 PEM (stored with mode 0600)."""
    return signer.private_bytes


def load_signer(pem: bytes) -> CryptoSigner:
    """A signer from a PKCS#8 PEM private key (an online role key, or a release key).

    Raises:
        ConfigError: not a usable private key.
    """
    try:
        private = serialization.load_pem_private_key(pem, password=None)
        return CryptoSigner(private)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"not a usable private key: {exc}") from exc


def release_key(pem: bytes | str) -> SSlibKey:
    """A release public key (PEM) as a TUF key.

    Raises:
        SignatureError: not an elliptic-curve public key.
    """
    return SSlibKey.from_crypto(load_public_key(pem))


# --- bytes in, bytes out ------------------------------------------------------------------------------------------


def _expires(now: float, seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(now + seconds), dt.UTC)


def _serialize(metadata: Metadata[Any]) -> bytes:
    try:
        return metadata.to_bytes(JSONSerializer(compact=True))
    except SerializationError as exc:  # only a bug gets here: everything serialized was built here
        raise MetadataError(f"cannot serialize {metadata.signed.type} metadata: {exc}") from exc


def _signed(signed: Any, signer: CryptoSigner) -> bytes:
    metadata: Metadata[Any] = Metadata(signed)
    metadata.sign(signer)
    return _serialize(metadata)


def parse(body: bytes, kind: type[Any] | None = None) -> Metadata[Any]:
    """Parse metadata bytes (without checking signatures), optionally insisting on its type.

    Raises:
        MetadataError: not TUF metadata, or another role type than `kind`.
    """
    try:
        metadata: Metadata[Any] = Metadata.from_bytes(body)
    except DeserializationError as exc:
        raise MetadataError(f"not TUF metadata: {exc}") from exc
    if kind is not None and not isinstance(metadata.signed, kind):
        raise MetadataError(f"expected {kind.type} metadata, got {metadata.signed.type}")
    return metadata


def expires_at(body: bytes) -> float:
    """The expiry of metadata bytes, in epoch seconds.

    Raises:
        MetadataError: not TUF metadata.
    """
    return float(parse(body).signed.expires.timestamp())


def meta_file(version: int, body: bytes) -> MetaFile:
    """What snapshot and timestamp say about a role's metadata: version, length and sha256."""
    return MetaFile(version=version, length=len(body), hashes={"sha256": hashlib.sha256(body).hexdigest()})


def build_root(
    keys: Mapping[str, Key], signer: CryptoSigner, now: float, expiries: Expiries, version: int = 1
) -> bytes:
    """Root metadata naming one key per top-level role (`keys`: role -> key), signed by the root key `signer`."""
    root = Root(version=version, expires=_expires(now, expiries.root_s), consistent_snapshot=True)
    for role in TOP_ROLES:
        root.add_key(keys[role], role)
    return _signed(root, signer)


def _target_file(facts: TargetFacts) -> TargetFile:
    return TargetFile(
        length=facts.length,
        hashes={"sha256": facts.sha256},
        path=facts.path,
        unrecognized_fields={"custom": facts.custom()},
    )


def target_facts(target: TargetFile) -> TargetFacts:
    """A TUF target as strata reads it.

    Raises:
        MetadataError: the target lacks a sha256 or a package fact.
    """
    return TargetFacts.parse(target.path, target.length, target.hashes, target.custom)


def release_role(facts: TargetFacts, signer: CryptoSigner, now: float, lifetime_s: float) -> bytes:
    """The image repository's role for one package, signed by a release key: one target, version = `now` in
    seconds (offline re-signs always count as newer), named like the target's path."""
    role = Targets(
        version=max(1, int(now)), expires=_expires(now, lifetime_s), targets={facts.path: _target_file(facts)}
    )
    return _signed(role, signer)


@dataclass(frozen=True)
class ReleaseRole:
    """A package's release-signed role, checked: its name, version, the key that signed it, expiry and target."""

    name: str
    version: int
    keyid: str
    expires_at: float
    target: TargetFacts
    body: bytes


def check_release_role(
    body: bytes, release_keys: Sequence[bytes | str], now: float, expected: TargetFacts | None = None
) -> ReleaseRole:
    """Check a package's release role: a targets role with exactly one target (the `expected` one, when given),
    no delegations, not expired at `now`, and signed by one of `release_keys`.

    Raises:
        SignatureError: no trusted release key signed it.
        MetadataError: malformed, expired, or about another package than `expected`.
    """
    metadata = parse(body, Targets)
    role: Targets = metadata.signed
    if role.delegations is not None:
        raise MetadataError("a package's release role may not delegate")
    if len(role.targets) != 1:
        raise MetadataError(f"a package's release role must name one target, it names {len(role.targets)}")
    facts = target_facts(next(iter(role.targets.values())))
    if expected is not None and facts != expected:
        raise MetadataError(
            f"the release role is for {facts.path} ({facts.digest}), not {expected.path} ({expected.digest})"
        )
    keyid = _signing_key(metadata, release_keys)
    if role.is_expired(dt.datetime.fromtimestamp(now, dt.UTC)):
        raise MetadataError(f"the release role of {facts.path} expired at {role.expires.isoformat()}")
    return ReleaseRole(facts.path, role.version, keyid, role.expires.timestamp(), facts, body)


def _signing_key(metadata: Metadata[Any], release_keys: Sequence[bytes | str]) -> str:
    if not release_keys:
        raise SignatureError("no release keys to check the release role against")
    for pem in release_keys:
        key = release_key(pem)
        signature = metadata.signatures.get(key.keyid)
        if signature is None:
            continue
        try:
            key.verify_signature(signature, metadata.signed_bytes)
        except UnverifiedSignatureError as exc:
            raise SignatureError(f"the release role's signature by {key.keyid[:16]} does not verify") from exc
        return key.keyid
    signers = ", ".join(k[:16] for k in metadata.signatures) or "nobody"
    raise SignatureError(f"the release role is signed by {signers}, not by a trusted release key")


@dataclass(frozen=True)
class Delegation:
    """A package role the image targets delegate to: its name and the release key that signs it."""

    name: str
    key: Key


def build_image_targets(
    delegations: Sequence[Delegation], version: int, now: float, expiries: Expiries, signer: CryptoSigner
) -> bytes:
    """The image repository's top-level targets: no targets of its own, one terminating delegation per package."""
    delegated = None
    if delegations:
        ordered = sorted(delegations, key=lambda d: d.name)
        delegated = Delegations(
            keys={d.key.keyid: d.key for d in ordered},
            roles={d.name: DelegatedRole(d.name, [d.key.keyid], 1, True, paths=[d.name]) for d in ordered},
        )
    targets = Targets(version=version, expires=_expires(now, expiries.targets_s), delegations=delegated)
    return _signed(targets, signer)


def build_director_targets(
    targets: Sequence[TargetFacts], version: int, now: float, expiries: Expiries, signer: CryptoSigner
) -> bytes:
    """A node's director targets: one target per package its desired state lets it run."""
    role = Targets(
        version=version,
        expires=_expires(now, expiries.targets_s),
        targets={facts.path: _target_file(facts) for facts in sorted(targets, key=lambda f: f.path)},
    )
    return _signed(role, signer)


def build_snapshot(
    roles: Mapping[str, tuple[int, bytes]], version: int, now: float, expiries: Expiries, signer: CryptoSigner
) -> bytes:
    """Snapshot over the current version of every targets role (`roles`: role name -> (version, bytes))."""
    meta = {f"{name}.json": meta_file(role_version, body) for name, (role_version, body) in sorted(roles.items())}
    return _signed(Snapshot(version=version, expires=_expires(now, expiries.snapshot_s), meta=meta), signer)


def build_timestamp(
    snapshot_version: int, snapshot: bytes, version: int, now: float, expiries: Expiries, signer: CryptoSigner
) -> bytes:
    """Timestamp naming the current snapshot by version, length and hash."""
    timestamp = Timestamp(
        version=version,
        expires=_expires(now, expiries.timestamp_s),
        snapshot_meta=meta_file(snapshot_version, snapshot),
    )
    return _signed(timestamp, signer)


def needs_refresh(body: bytes, now: float, lifetime_s: float) -> bool:
    """True when online metadata has less than half its lifetime left (and is re-signed before nodes see it stale).

    Raises:
        MetadataError: not TUF metadata.
    """
    return expires_at(body) - now < lifetime_s / 2
