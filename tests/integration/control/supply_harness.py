"""Signed packages, a control plane with release keys, and a node's view of its TUF metadata, all in-process.

`ServedFetcher` is python-tuf's fetcher over the in-process API (TestClient), with a table of answers an attacker
substitutes: a compromised server or mirror that replays, withholds, pads or re-signs metadata. The node's real
verification (`strata.trust.verify.check_target`) runs against it, with the node's real trust folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib import parse

from control_harness import Harness, NodeCredentials, cert_headers, csr_for
from cryptography.hazmat.primitives.asymmetric import ec
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface

from strata.core.package import tar_bytes, verify_package
from strata.package_build import build_package
from strata.trust.pinned import save_pinned
from strata.trust.release import SignedRelease, sign_release
from strata.trust.targets import TargetFacts
from strata.trust.tuf_repo import load_signer
from strata.trust.verify import check_target

Override = bytes | Callable[[bytes], bytes]


@dataclass(frozen=True)
class SignedPackage:
    """A package tar and its release signature (bundle and release role)."""

    tar: bytes
    signature: SignedRelease
    digest: str
    path: Path

    def headers(self) -> dict[str, str]:
        bundle, role = self.signature.to_base64()
        return {"X-Strata-Signature": bundle, "X-Strata-Release-Role": role}


def make_signed(
    model: Path, out: Path, key: Path, version: str = "1", profile: str = "cpu-generic", lifetime_s: float = 86400.0
) -> SignedPackage:
    """Build a digits package and sign it with the release key `key`."""
    package = build_package(model, out, name="digits", version=version, profile=profile)
    signature = sign_release(package.path, key, time.time(), lifetime_s)
    package = verify_package(package.path)
    return SignedPackage(tar_bytes(package), signature, package.digest, package.path)


def upload_signed(server: Harness, package: SignedPackage) -> dict[str, Any]:
    response = server.client.post(
        "/v1/packages",
        content=package.tar,
        headers={**server.admin, "Content-Type": "application/x-tar", **package.headers()},
    )
    assert response.status_code in (200, 201), response.text
    result: dict[str, Any] = response.json()
    return result


@dataclass
class ServedFetcher(FetcherInterface):
    """python-tuf's fetcher over the in-process API; `overrides` (by file name) are what an attacker serves."""

    harness: Harness
    headers: dict[str, str]
    overrides: dict[tuple[str, str], Override] = field(default_factory=dict)
    fetched: list[str] = field(default_factory=list)

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = parse.urlsplit(url).path
        repository = "image" if path.startswith("/v1/tuf/image/") else "director"
        name = parse.unquote(path.rsplit("/", 1)[1])
        self.fetched.append(f"{repository}:{name}")
        response = self.harness.client.get(path, headers=self.headers)
        override = self.overrides.get((repository, name))
        if override is None and response.status_code != 200:
            raise DownloadHTTPError(f"{url}: HTTP {response.status_code}", response.status_code)
        body = response.content
        if override is not None:
            body = override(body) if callable(override) else override
        return iter([body[i : i + 4096] for i in range(0, len(body), 4096)] or [b""])


@dataclass
class Node:
    """An enrolled node's trust folder, and its verification of desired packages against the server."""

    harness: Harness
    credentials: NodeCredentials
    data_dir: Path
    profile: str = "cpu-generic"
    fetcher: ServedFetcher = field(init=False)

    def __post_init__(self) -> None:
        self.fetcher = ServedFetcher(self.harness, self.credentials.headers)

    def desired_variant(self, version: str | None = None, variant: str | None = None) -> tuple[str, dict[str, Any]]:
        """(version, variant) of digits from the node's desired state."""
        state = self.harness.desired(self.credentials).json()
        [model] = state["models"]
        chosen = next(v for v in model["variants"] if variant is None or v["id"] == variant)
        return model["version"] if version is None else version, chosen

    def check(
        self, variant: dict[str, Any] | None = None, version: str | None = None, profile: str | None = None
    ) -> TargetFacts:
        """The node's real TUF verification of a desired package (what its child process runs)."""
        desired_version, desired = self.desired_variant()
        request = {
            "data_dir": str(self.data_dir),
            "server": "http://testserver",
            "node_id": self.credentials.node_id,
            "model": "digits",
            "version": version or desired_version,
            "variant": variant or desired,
            "profile": profile or self.profile,
            "runtimes": ["onnxruntime"],
        }
        return check_target(request, fetcher=self.fetcher)

    def trusted(self, repository: str, role: str) -> bytes:
        """The metadata the node keeps as trusted."""
        return (self.data_dir / "trust" / "tuf" / repository / f"{role}.json").read_bytes()


def enroll_node(harness: Harness, data_dir: Path, name: str = "edge-1", profile: str = "cpu-generic") -> Node:
    """Enroll a node (a key and CSR made for it) and pin what the answer carries, as the agent does."""
    binding = {"name": name, "tier": "device", "labels": {"site": "lab"}}
    token = harness.client.post("/v1/enrollment-tokens", json=binding, headers=harness.admin).json()["token"]
    key = ec.generate_private_key(ec.SECP256R1())
    body = {
        "token": token,
        "name": name,
        "tier": "device",
        "labels": {"site": "lab"},
        "profile": profile,
        "csr": csr_for(key, name),
    }
    response = harness.client.post("/v1/enroll", json=body)
    assert response.status_code == 201, response.text
    answer = response.json()
    save_pinned(data_dir, answer["release_keys"], answer["tuf_roots"])
    certificate = answer["certificate"]
    credentials = NodeCredentials(answer["node_id"], cert_headers(certificate), certificate, key)
    return Node(harness, credentials, data_dir, profile)


def server_signer(harness: Harness, name: str) -> Any:
    """One of the server's online TUF keys (`image-timestamp`, `director-targets`...), as an attacker who stole it."""
    return load_signer((harness.plane.settings.tuf_keys_dir / f"{name}.pem").read_bytes())
