"""The agent's supply-chain guard without a control plane: pinning, unsigned refusals, a verifier that fails
closed, signature downloads checked by hash, and a manifest cut off at the length TUF states."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from strata.agent.client import ControlPlaneClient
from strata.agent.pieces import PackageFetcher
from strata.agent.plan import Download
from strata.agent.reconciler import NodeIdentity, Reconciler
from strata.agent.repository import ModelRepository
from strata.agent.store import ArtifactStore
from strata.agent.supply import SupplyGuard
from strata.agent.transport import HttpResponse
from strata.core.errors import ConfigError, MetadataError, SignatureError, VerificationError
from strata.core.hashing import canonical_json
from strata.core.package import Package
from strata.core.profiles import get_profile
from strata.core.wire import VariantRef
from strata.package_build import build_package

PEM = "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n"
ROOTS = {"image": '{"signed": {}}', "director": '{"signed": {}}'}


class Blobs:
    """Serves blobs by sha256 as the control plane's blob endpoint would; `bodies` can lie about a blob."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.requests: list[str] = []

    def add(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.bodies[sha] = data
        return sha

    def request(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes | None = None, timeout: float
    ) -> HttpResponse:
        raise AssertionError(f"unexpected {method} {url}")

    @contextlib.contextmanager
    def stream(self, method: str, url: str, *, headers: Mapping[str, str], timeout: float) -> Iterator[_Body]:
        self.requests.append(url)
        yield _Body(self.bodies[url.rsplit("/", 1)[1].split("?")[0]])


class _Body:
    def __init__(self, data: bytes) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self._data = data

    def read(self, size: int) -> bytes:
        piece, self._data = self._data[:size], self._data[size:]
        return piece


@pytest.fixture
def blobs() -> Blobs:
    return Blobs()


@pytest.fixture
def client(blobs: Blobs) -> ControlPlaneClient:
    client = ControlPlaneClient("http://control.invalid", blobs)
    client.authenticate("n1")
    return client


@pytest.fixture
def package(digits_onnx: Path, tmp_path: Path) -> Package:
    return build_package(digits_onnx, tmp_path / "pkg", name="digits", version="1")


def ref_of(package: Package, blobs: Blobs, signature: str | None = None) -> VariantRef:
    manifest = package.manifest
    return VariantRef(
        id=manifest.variant,
        profile=manifest.profile,
        runtime=manifest.runtime,
        precision=manifest.precision,
        digest=manifest.digest,
        blob=blobs.add(b"tar of " + manifest.digest.encode()),
        size=10,
        signature=signature,
    )


def test_pinning_follows_the_enrollment_answer(
    client: ControlPlaneClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    guard = SupplyGuard(tmp_path, client, "cpu-generic", ["onnxruntime"])
    guard.pin((), {})  # a development server hands out no keys
    assert (guard.pinned, guard.mode) == (False, "unverified")
    with caplog.at_level(logging.WARNING, logger="strata.agent"):
        guard.warn_if_unverified()
        guard.warn_if_unverified()
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "UNSIGNED" in caplog.records[0].message
    with pytest.raises(ConfigError, match="TUF root"):
        guard.pin([PEM], {"image": "{}"})
    guard.pin([PEM], ROOTS)
    assert (guard.pinned, guard.mode) == (True, "verified")


def test_an_unsigned_package_is_refused_before_anything_is_fetched_or_run(
    client: ControlPlaneClient, blobs: Blobs, package: Package, tmp_path: Path
) -> None:
    guard = SupplyGuard(tmp_path, client, "cpu-generic", ["onnxruntime"], python="/nonexistent/python")
    guard.pin([PEM], ROOTS)
    unsigned = ref_of(package, blobs)
    with pytest.raises(SignatureError, match=r"digits 1 \(cpu-generic-fp32\) is not signed"):
        guard.check_target("digits", "1", unsigned)
    with pytest.raises(SignatureError, match="not signed"):
        guard.fetch_bundle(unsigned)

    store = ArtifactStore(tmp_path / "node")
    identity = NodeIdentity("device", {}, get_profile("cpu-generic"), False, None, "n1")
    reconciler = Reconciler(store, ModelRepository(), client, identity, frozenset({"onnxruntime"}), supply=guard)
    reconciler.execute(Download("digits", "1", unsigned))
    [failure] = reconciler.status(None).failures
    assert (failure.kind, failure.version) == ("signature", "1")
    assert "is not signed" in failure.reason
    assert blobs.requests == []
    assert store.downloaded_blobs() == frozenset()
    assert reconciler.status(None).supply == "verified"


def test_a_verifier_that_cannot_run_or_answer_refuses(
    client: ControlPlaneClient, blobs: Blobs, package: Package, tmp_path: Path
) -> None:
    signed = ref_of(package, blobs, signature="a" * 64)
    missing = SupplyGuard(tmp_path, client, "cpu-generic", [], python="/nonexistent/python")
    with pytest.raises(MetadataError, match="could not run"):
        missing.check_target("digits", "1", signed)
    silent = SupplyGuard(tmp_path, client, "cpu-generic", [], python="/bin/false")
    with pytest.raises(SignatureError, match="the verifier failed"):
        silent.check_package(tmp_path, tmp_path / "x.sig", signed.digest)


def test_the_real_verifier_refuses_when_nothing_is_pinned_or_the_server_is_gone(
    client: ControlPlaneClient, blobs: Blobs, package: Package, tmp_path: Path
) -> None:
    signed = ref_of(package, blobs, signature="a" * 64)
    guard = SupplyGuard(tmp_path, client, "cpu-generic", ["onnxruntime"])
    with pytest.raises(MetadataError, match="pinned no release keys"):
        guard.check_target("digits", "1", signed)


def test_a_release_signature_is_downloaded_once_and_checked_by_hash(
    client: ControlPlaneClient, blobs: Blobs, package: Package, tmp_path: Path
) -> None:
    guard = SupplyGuard(tmp_path, client, "cpu-generic", [])
    bundle = b'{"bundle": 1}'
    good = ref_of(package, blobs, signature=blobs.add(bundle))
    path = guard.fetch_bundle(good)
    assert path.read_bytes() == bundle
    assert guard.fetch_bundle(good) == path
    assert len(blobs.requests) == 1

    lying = ref_of(package, blobs, signature="b" * 64)
    blobs.bodies["b" * 64] = b"not the signature"
    with pytest.raises(VerificationError, match="does not hash"):
        guard.fetch_bundle(lying)
    blobs.bodies["b" * 64] = b" " * (2 << 20)
    with pytest.raises(VerificationError, match="larger than"):
        guard.fetch_bundle(lying)


def test_a_manifest_longer_than_tuf_states_is_cut_off(
    client: ControlPlaneClient, blobs: Blobs, package: Package, tmp_path: Path
) -> None:
    canonical = canonical_json(package.manifest.to_json())
    ref = ref_of(package, blobs)
    # The server answers the manifest's name with the manifest and endless bytes after it.
    blobs.bodies[ref.digest.removeprefix("sha256:")] = canonical + b" " * (1 << 20)
    fetcher = PackageFetcher(client, ArtifactStore(tmp_path / "node"))
    with pytest.raises(VerificationError, match=rf"longer than the {len(canonical)} bytes its TUF target states"):
        fetcher.fetch(ref, manifest_limit=len(canonical))
    assert not list((tmp_path / "node" / "downloads").glob("*.manifest"))
