"""`python -m strata.trust.verify`: the node's supply-chain checks, in a short-lived child process.

cryptography, securesystemslib, python-tuf and model_signing together take more memory than the agent's whole
70 MB budget, so the agent never imports them: it runs this module with one JSON request on stdin and reads one
JSON verdict from stdout; the memory is gone when the child exits (the same pattern as CEL placement rules).

Requests:
    {"op": "target", "data_dir", "server", "node_id", "headers", "model", "version", "variant": VariantRef,
     "profile", "runtimes", "timeout"}
        Refresh the director (this node's) and image repositories with `tuf.ngclient.Updater` from the node's
        trusted metadata, find the package's target in both, check the image role against the pinned release keys,
        that the two repositories agree, that the desired state names the same package, and that this node's
        profile can run it. Verdict: {"ok": true, "target": TargetFacts}.
    {"op": "package", "data_dir", "folder", "bundle", "digest", "hashes"?}
        Check the release signature (model-signing bundle file) over the assembled package folder. With "hashes"
        (path -> sha256 of each package file's plaintext, which the agent computed in memory because the files on
        disk are sealed), those stand for the files the manifest lists; manifest.json is always read from disk.
        Verdict: {"ok": true, "key": hint}.
A refusal is {"ok": false, "kind": "signature" | "tuf" | "transport", "reason": "..."}; "transport" means the
server could not be reached (try again later), the others that the package must not be trusted.

The fetcher under the Updater is plain urllib with the node's credential. Length limits come from python-tuf:
`UpdaterConfig` bounds each top-level file, and snapshot and timestamp state every other file's length.
"""

from __future__ import annotations

import json
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final
from urllib import parse

from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from strata.core.errors import ConfigError, MetadataError, PackageError, SignatureError, StrataError, TransportError
from strata.core.profiles import get_profile
from strata.trust.fleet_tls import node_client_context
from strata.trust.pinned import PinnedTrust, load_pinned, metadata_dir
from strata.trust.signing import read_bundle, verify_package_signature
from strata.trust.targets import TargetFacts, check_agreement, check_desired, check_profile, target_path
from strata.trust.tuf_repo import check_release_role, target_facts

_READ: Final = 1 << 16
# Top-level metadata limits: a timestamp is tiny; snapshots and targets grow with the packages in the registry.
UPDATER_CONFIG: Final = UpdaterConfig(
    max_root_rotations=32,
    max_delegations=4,
    root_max_length=64 << 10,
    timestamp_max_length=16 << 10,
    snapshot_max_length=8 << 20,
    targets_max_length=8 << 20,
    prefix_targets_with_hash=False,
)
# What each python-tuf refusal means, in the words of the attacks TUF exists to stop.
_MEANING: Final = {
    tuf_errors.EqualVersionNumberError: "replayed metadata",
    tuf_errors.BadVersionNumberError: "rollback or mix-and-match",
    tuf_errors.ExpiredMetadataError: "stale metadata (freeze)",
    tuf_errors.LengthOrHashMismatchError: "mix-and-match or tampered metadata",
    tuf_errors.UnsignedMetadataError: "metadata not signed by the keys its root names",
    tuf_errors.DownloadLengthMismatchError: "endless data",
}


class UrllibFetcher(FetcherInterface):
    """python-tuf's fetcher over urllib, with the node's credential and an optional TLS context."""

    def __init__(self, headers: Mapping[str, str], timeout: float, context: ssl.SSLContext | None = None) -> None:
        self.headers = dict(headers)
        self.timeout = timeout
        self.context = context

    def _fetch(self, url: str) -> Iterator[bytes]:
        request = urllib.request.Request(url, headers=self.headers)  # noqa: S310 - the server's own http(s) URL
        try:
            # the server's own http(s) URL, as above
            response = urllib.request.urlopen(request, timeout=self.timeout, context=self.context)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise tuf_errors.DownloadError(f"{url}: {exc}") from exc
        return self._chunks(response)

    @staticmethod
    def _chunks(response: Any) -> Iterator[bytes]:
        with response:
            try:
                while chunk := response.read(_READ):
                    yield chunk
            except OSError as exc:
                raise tuf_errors.DownloadError(f"connection broke: {exc}") from exc


def _refused(repository: str, exc: Exception) -> StrataError:
    """A python-tuf error as strata's: metadata refused, or the server out of reach."""
    meaning = next((text for kind, text in _MEANING.items() if isinstance(exc, kind)), None)
    detail = str(exc) or type(exc).__name__
    if meaning is not None:
        return MetadataError(f"{repository} metadata refused ({meaning}): {detail}")
    if isinstance(exc, tuf_errors.DownloadHTTPError) and (exc.status_code >= 500 or exc.status_code in (401, 403, 429)):
        return TransportError(f"{repository} metadata: {detail}")
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return MetadataError(f"{repository} metadata refused: the server does not serve it ({detail})")
    if isinstance(exc, tuf_errors.DownloadError):
        return TransportError(f"{repository} metadata: {detail}")
    return MetadataError(f"{repository} metadata refused: {detail}")


def _updater(data_dir: Path, pinned: PinnedTrust, repository: str, url: str, fetcher: FetcherInterface) -> Updater:
    folder = metadata_dir(data_dir, repository)
    folder.mkdir(parents=True, exist_ok=True)
    root = pinned.tuf_roots[repository].encode()
    try:
        return Updater(str(folder), url, fetcher=fetcher, config=UPDATER_CONFIG, bootstrap=root)
    except (tuf_errors.RepositoryError, ValueError) as exc:
        raise MetadataError(f"the pinned {repository} root is not usable: {exc}") from exc


def _lookup(updater: Updater, repository: str, path: str) -> Any:
    try:
        updater.refresh()
        return updater.get_targetinfo(path)
    except (tuf_errors.RepositoryError, tuf_errors.DownloadError, ValueError) as exc:
        raise _refused(repository, exc) from exc


def check_target(
    request: Mapping[str, Any], fetcher: FetcherInterface | None = None, now: float | None = None
) -> TargetFacts:
    """The `target` request: see the module docstring. `fetcher` replaces the urllib one (tests serve bytes).

    Raises:
        MetadataError: the director or image metadata was refused, the two disagree, the target is not the desired
            package, or this node's profile cannot run it.
        SignatureError: the package's image role is not signed by a pinned release key.
        TransportError: the server could not be reached.
        ConfigError: the node pinned no trust, or the request is malformed.
    """
    data_dir = Path(request["data_dir"])
    pinned = load_pinned(data_dir)
    if pinned is None:
        raise ConfigError("this node pinned no release keys at enrollment")
    variant = request["variant"]
    path = target_path(str(request["model"]), str(request["version"]), str(variant["id"]))
    if fetcher is None:
        # Over mutual TLS as the node itself: the fleet CA checks the server, the node certificate names the node.
        context = node_client_context(data_dir / "trust") if str(request["server"]).startswith("https:") else None
        fetcher = UrllibFetcher(request.get("headers") or {}, float(request.get("timeout", 30.0)), context)
    server = str(request["server"]).rstrip("/")
    node = parse.quote(str(request["node_id"]), safe="")

    director = _updater(data_dir, pinned, "director", f"{server}/v1/tuf/director/{node}/", fetcher)
    found = _lookup(director, "director", path)
    if found is None:
        raise MetadataError(f"the director's metadata for this node does not list {path}: it is not meant to run here")
    director_facts = target_facts(found)

    image = _updater(data_dir, pinned, "image", f"{server}/v1/tuf/image/", fetcher)
    found = _lookup(image, "image", path)
    if found is None:
        raise SignatureError(f"the image repository does not list {path}: no release key signed it")
    image_facts = target_facts(found)
    role_file = metadata_dir(data_dir, "image") / f"{parse.quote(path, safe='')}.json"
    try:
        role = role_file.read_bytes()
    except OSError as exc:
        raise MetadataError(f"the image role of {path} was not kept: {exc}") from exc
    check_release_role(role, pinned.release_keys, time.time() if now is None else now, expected=image_facts)

    check_agreement(image_facts, director_facts)
    check_desired(image_facts, str(request["model"]), str(request["version"]), variant)
    check_profile(image_facts, get_profile(str(request["profile"])), frozenset(request.get("runtimes") or ()) or None)
    return image_facts


def check_package(request: Mapping[str, Any]) -> str:
    """The `package` request: see the module docstring; returns the signing key's hint.

    Raises:
        SignatureError: the bundle is not by a pinned release key, or does not match the folder.
        PackageError: the folder is not a package.
        ConfigError: the node pinned no trust, or the bundle cannot be read.
    """
    data_dir = Path(request["data_dir"])
    pinned = load_pinned(data_dir)
    if pinned is None:
        raise ConfigError("this node pinned no release keys at enrollment")
    bundle = read_bundle(Path(request["bundle"]))
    hashes = request.get("hashes")
    if hashes is not None and not (
        isinstance(hashes, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())
    ):
        raise ConfigError("'hashes' must map package file paths to sha256 hex digests")
    return verify_package_signature(
        Path(request["folder"]), bundle, pinned.release_keys, str(request["digest"]), hashes=hashes
    )


def answer(request: Mapping[str, Any]) -> dict[str, Any]:
    """The verdict for one request; never raises (a verifier that breaks refuses)."""
    op = request.get("op") if isinstance(request, Mapping) else None
    fallback = "signature" if op == "package" else "tuf"
    try:
        if op == "target":
            return {"ok": True, "target": check_target(request).to_json()}
        if op == "package":
            return {"ok": True, "key": check_package(request)}
        return {"ok": False, "kind": fallback, "reason": f"unknown verification request {op!r}"}
    except SignatureError as exc:
        return {"ok": False, "kind": "signature", "reason": str(exc)}
    except (MetadataError, PackageError) as exc:
        return {"ok": False, "kind": fallback, "reason": str(exc)}
    except TransportError as exc:
        return {"ok": False, "kind": "transport", "reason": str(exc)}
    except (StrataError, KeyError, TypeError, ValueError, OSError) as exc:
        return {"ok": False, "kind": fallback, "reason": f"cannot verify: {exc or type(exc).__name__}"}


def main() -> None:
    """Read one JSON request from stdin, write one JSON verdict to stdout."""
    try:
        request = json.loads(sys.stdin.read())
    except ValueError as exc:
        verdict: dict[str, Any] = {"ok": False, "kind": "tuf", "reason": f"unreadable verification request: {exc}"}
    else:
        verdict = answer(request)
    sys.stdout.write(json.dumps(verdict) + "\n")


if __name__ == "__main__":
    main()
