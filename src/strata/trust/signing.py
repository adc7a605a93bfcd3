"""Release keys and package signatures in the OpenSSF model-signing format (the `model_signing` package, EC keys).

A release key is an EC P-256 key pair the model owner keeps offline (`strata keys create`). Signing a package
(`strata model sign`) hashes every file of the package folder with model-signing's file serialization (sha256)
and signs the list in a DSSE envelope inside a Sigstore bundle: the signature, kept beside the package as
`PACKAGE.sig`, never inside it (strata's `verify_package` refuses files the manifest does not list). Any
`model_signing verify key --public_key release.pub PACKAGE --signature PACKAGE.sig` checks it.

The bundle covers `manifest.json` as bytes, and nodes rebuild a package with its manifest in canonical JSON (the
bytes its digest is taken over), so signing first rewrites `manifest.json` in that canonical form: the package
digest does not change, and the folder the operator signed is byte for byte the folder every node assembles.

Verification (`verify_package_signature`) needs the bundle to be by one of the trusted release keys, the files to
match it, and the signed file list to be exactly the package's: `manifest.json` hashing to the package digest and
every file the manifest lists with the manifest's sha256. So the signature vouches for the digest, which pins
every byte. Imports cryptography and model_signing: the agent runs this in a child process only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strata.core.errors import ConfigError, PackageError, SignatureError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json, sha256_bytes
from strata.core.package import MANIFEST_NAME, Manifest, read_manifest

BUNDLE_SUFFIX: Final = ".sig"
MAX_BUNDLE_BYTES: Final = 1 << 20
_PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"


def create_release_key(out_dir: Path, name: str = "release") -> tuple[Path, Path]:
    """Make an EC P-256 release key pair: `out_dir/NAME.key` (PKCS#8 PEM, mode 0600) and `out_dir/NAME.pub`.

    Raises:
        ConfigError: either file exists already (a release key is never overwritten), or they cannot be written.
    """
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} exists; a release key is never overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(private_path, private_pem, mode=0o600)
        write_bytes_atomic(public_path, public_pem(key.public_key()))
    except OSError as exc:
        raise ConfigError(f"cannot write the release key to {out_dir}: {exc}") from exc
    return private_path, public_path


def public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of a public key (the form model-signing hashes into its key hint)."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(pem: bytes | str) -> ec.EllipticCurvePublicKey:
    """Parse a release public key.

    Raises:
        SignatureError: not a PEM public key, or not an elliptic-curve key on P-256, P-384 or P-521.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"not a PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise SignatureError("a release key must be an elliptic-curve key on P-256, P-384 or P-521")
    return key


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a release private key (unencrypted PKCS#8 PEM, as `create_release_key` writes).

    Raises:
        ConfigError: unreadable, encrypted, or not an elliptic-curve key.
    """
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the release key {path}: {exc}") from exc
    if b"-----BEGIN PUBLIC KEY-----" in pem:
        raise ConfigError(
            f"{path} is a public key: sign with the private half (the .key file `strata keys create` wrote beside it)"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the release key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an elliptic-curve private key")
    return key


def key_hint(pem: bytes | str) -> str:
    """The id model-signing bundles name their key by: hex sha256 of the key's SubjectPublicKeyInfo PEM.

    Raises:
        SignatureError: `pem` is not a usable public key.
    """
    return sha256_bytes(public_pem(load_public_key(pem)))


def canonicalize_manifest(folder: Path) -> Manifest:
    """Rewrite `folder/manifest.json` as canonical JSON (the bytes its digest is taken over, which nodes assemble)
    when it is not already; the package digest stays the same.

    Raises:
        PackageError: the manifest does not parse.
        OSError: the file cannot be written.
    """
    manifest = read_manifest(folder)
    canonical = canonical_json(manifest.to_json())
    path = folder / MANIFEST_NAME
    if path.read_bytes() != canonical:
        write_bytes_atomic(path, canonical)
    return manifest


def _hashing_config() -> Any:
    import model_signing

    return model_signing.hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)


def sign_package(folder: Path, key_path: Path) -> bytes:
    """Sign a package folder with a release key; return the Sigstore bundle (JSON bytes).

    The manifest is canonicalized first (see the module docstring); the bundle is not written into the folder.

    Raises:
        ConfigError: the key cannot be read.
        PackageError: the folder is not a package.
        SignatureError: model-signing could not sign it.
    """
    import model_signing

    load_private_key(key_path)
    try:
        canonicalize_manifest(folder)
    except OSError as exc:
        raise PackageError(f"cannot rewrite the manifest of {folder}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix="strata-sign-") as tmp:
        bundle_path = Path(tmp) / "bundle.sig"
        try:
            signer = model_signing.signing.Config().use_elliptic_key_signer(private_key=key_path)
            signer.set_hashing_config(_hashing_config()).sign(folder, bundle_path)
            return bundle_path.read_bytes()
        except (OSError, ValueError) as exc:
            raise SignatureError(f"model-signing could not sign {folder}: {exc}") from exc


def bundle_hint(bundle: bytes) -> str:
    """The key hint a bundle names (which key signed it, by the model-signing key id).

    Raises:
        SignatureError: the bundle is not a model-signing bundle made with a key.
    """
    try:
        hint = json.loads(bundle)["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"the signature is not a model-signing bundle made with a key: {exc}") from exc
    if not isinstance(hint, str) or not hint:
        raise SignatureError("the signature does not name the key that made it")
    return hint


def signed_files(bundle: bytes) -> dict[str, str]:
    """The files and sha256 a bundle's statement lists (parsed, not verified: call after verifying).

    Raises:
        SignatureError: the statement is not a model-signing statement over sha256 file hashes.
    """
    try:
        envelope = json.loads(bundle)["dsseEnvelope"]
        statement = json.loads(base64.b64decode(envelope["payload"], validate=True))
        if statement["predicateType"] != _PREDICATE_TYPE:
            raise SignatureError(f"the signature's predicate is {statement['predicateType']!r}, not model-signing's")
        predicate = statement["predicate"]
        if predicate["serialization"]["method"] != "files":
            raise SignatureError("the signature hashes shards; strata signs whole files")
        files: dict[str, str] = {}
        for resource in predicate["resources"]:
            if resource["algorithm"] != "sha256":
                raise SignatureError(f"the signature hashes {resource['name']} with {resource['algorithm']}")
            files[str(resource["name"])] = str(resource["digest"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise SignatureError(f"the signature's statement is malformed: {exc}") from exc
    return files


def check_signed_files(files: dict[str, str], manifest: Manifest) -> None:
    """The signed file list must be exactly the package: the canonical manifest (hashing to the package digest)
    and every file the manifest lists, with the manifest's sha256.

    Raises:
        SignatureError: a file is missing from the signature, extra, or signed with another hash.
    """
    expected = {MANIFEST_NAME: manifest.digest.removeprefix("sha256:")}
    expected.update({entry.path: entry.sha256 for entry in manifest.files})
    if files != expected:
        missing = sorted(expected.keys() - files.keys())
        extra = sorted(files.keys() - expected.keys())
        changed = sorted(k for k in expected.keys() & files.keys() if expected[k] != files[k])
        raise SignatureError(
            f"the signature is for other files than package {manifest.digest}: "
            f"unsigned {missing}, not in the package {extra}, different {changed}"
        )


def _known_hashes_config(hashes: Mapping[str, str]) -> Any:
    """A model-signing hashing configuration that reports `hashes` (path -> sha256 hex) for the package's files
    instead of reading them, and hashes only `manifest.json` from disk.

    For a node that stores packages sealed (encryption at rest): the ciphertext on disk is not what was signed, and
    the plaintext never touches the disk, so the agent hashes each file's plaintext in memory as it seals it and
    hands the hashes over. model-signing then compares them with the signed list exactly as it would its own.
    """
    from model_signing import hashing, manifest
    from model_signing._hashing.hashing import Digest

    # model_signing is Any to mypy (follow_imports = "skip" in pyproject.toml), so this subclasses Any.
    class KnownHashes(hashing.Config):  # type: ignore[misc]
        def hash(self, model_path: Any, *, files_to_hash: Any = None) -> Any:
            files = dict(hashes)
            files[MANIFEST_NAME] = hashlib.sha256((Path(model_path) / MANIFEST_NAME).read_bytes()).hexdigest()
            items = [
                manifest.FileManifestItem(path=PurePosixPath(path), digest=Digest("sha256", bytes.fromhex(value)))
                for path, value in files.items()
            ]
            serialization = manifest._FileSerialization("sha256", False)
            return manifest.Manifest(Path(model_path).name, items, serialization)

    return KnownHashes()


def verify_package_signature(
    folder: Path,
    bundle: bytes,
    release_keys: Sequence[bytes | str],
    digest: str | None = None,
    hashes: Mapping[str, str] | None = None,
) -> str:
    """Check that `bundle` is a release signature over the package in `folder`; return the signing key's hint.

    The folder's manifest must be canonical (as nodes assemble it, and as `canonicalize_manifest` leaves it).
    `hashes`, when the folder's files are sealed, gives the sha256 of each file's plaintext (see
    `_known_hashes_config`); the signed list must still equal the manifest's hashes, which the node checked
    against the plaintext.

    Raises:
        SignatureError: no trusted key made the bundle, the signature does not verify, the files differ from
            what was signed, or the signed files are not exactly this package's (or its digest is not `digest`).
        PackageError: the folder has no readable manifest.
    """
    import model_signing

    if len(bundle) > MAX_BUNDLE_BYTES:
        raise SignatureError(f"the signature is larger than {MAX_BUNDLE_BYTES} bytes")
    if not release_keys:
        raise SignatureError("no release keys to check the signature against")
    manifest = read_manifest(folder)
    if digest is not None and manifest.digest != digest:
        raise SignatureError(f"the package is {manifest.digest}, expected {digest}")
    hint = bundle_hint(bundle)
    trusted = {key_hint(pem): pem for pem in release_keys}
    pem = trusted.get(hint)
    if pem is None:
        raise SignatureError(
            f"the package is signed by an unknown key ({hint[:16]}); trusted release keys: "
            + ", ".join(sorted(h[:16] for h in trusted))
        )
    with tempfile.TemporaryDirectory(prefix="strata-verify-") as tmp:
        key_path, bundle_path = Path(tmp) / "release.pub", Path(tmp) / "bundle.sig"
        key_path.write_bytes(pem.encode() if isinstance(pem, str) else pem)
        bundle_path.write_bytes(bundle)
        try:
            verifier = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key_path)
            config = _hashing_config() if hashes is None else _known_hashes_config(hashes)
            verifier.set_hashing_config(config).verify(folder, bundle_path)
        except Exception as exc:  # model-signing raises ValueError, InvalidSignature, protobuf errors: wrap all
            raise SignatureError(f"the release signature does not verify: {exc or type(exc).__name__}") from exc
    check_signed_files(signed_files(bundle), manifest)
    return hint


def read_bundle(path: Path) -> bytes:
    """Read a signature bundle from disk, refusing one larger than `MAX_BUNDLE_BYTES`.

    Raises:
        ConfigError: missing or unreadable.
        SignatureError: too large.
    """
    try:
        if path.stat().st_size > MAX_BUNDLE_BYTES:
            raise SignatureError(f"{path} is larger than {MAX_BUNDLE_BYTES} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the signature {path}: {exc}") from exc


def bundle_id(bundle: bytes) -> str:
    """The blob id a bundle is stored and fetched under: its hex sha256."""
    return hashlib.sha256(bundle).hexdigest()
