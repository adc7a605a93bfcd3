"""Package uploads: verified whole, stored by content address, registered once; and the registry views."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import replace

from control_harness import T0, Harness, StartServer

from strata.control.settings import ServerSettings
from strata.core.package import MODEL_NAME


def _leftovers(server: Harness) -> list[str]:
    return sorted(p.name for p in server.plane.settings.tmp_dir.iterdir())


def test_upload_registers_the_variant_and_stores_the_tar_by_its_hash(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    tar = make_package(metrics={"accuracy": 0.98})
    response = server.upload(tar)
    assert response.status_code == 201, response.text
    added = response.json()
    sha = hashlib.sha256(tar).hexdigest()
    assert added["model"] == "digits"
    assert added["version"] == "1"
    assert added["variant"] == "cpu-generic-fp32"
    assert added["digest"].startswith("sha256:")
    assert added["blob"] == sha
    assert added["size"] == len(tar)
    assert added["created"] is True
    stored = server.plane.settings.blobs_dir / "sha256" / sha[:2] / sha[2:4] / sha
    assert stored.read_bytes() == tar
    assert _leftovers(server) == []

    [model] = server.client.get("/v1/models", headers=server.admin).json()
    assert model["name"] == "digits"
    assert model["created_at"] == T0
    [version] = model["versions"]
    [variant] = version["variants"]
    assert variant["id"] == "cpu-generic-fp32"
    assert variant["digest"] == added["digest"]
    assert variant["blob"] == sha
    assert variant["size"] == len(tar)
    assert variant["metrics"] == {"accuracy": 0.98}
    assert variant["profile"] == "cpu-generic"
    assert variant["runtime"] == "onnxruntime"
    assert variant["precision"] == "fp32"
    assert variant["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in variant["outputs"]} == {"label", "probabilities"}
    assert server.client.get("/v1/models/digits", headers=server.admin).json() == model
    assert server.client.get("/v1/models/digits/versions/1", headers=server.admin).json() == version


def test_same_package_again_is_a_no_op(server: Harness, make_package: Callable[..., bytes]) -> None:
    tar = make_package()
    assert server.upload(tar).status_code == 201
    again = server.upload(tar)
    assert again.status_code == 200
    assert again.json()["created"] is False
    assert len(server.client.get("/v1/models/digits", headers=server.admin).json()["versions"][0]["variants"]) == 1
    assert _leftovers(server) == []


def test_same_variant_with_another_digest_conflicts(server: Harness, make_package: Callable[..., bytes]) -> None:
    assert server.upload(make_package(metrics={"accuracy": 0.9})).status_code == 201
    other = make_package(metrics={"accuracy": 0.5})
    response = server.upload(other)
    assert response.status_code == 409
    assert response.json()["code"] == "conflict"
    assert "cpu-generic-fp32" in response.json()["error"]
    sha = hashlib.sha256(other).hexdigest()
    assert server.client.get(f"/v1/blobs/sha256/{sha}", headers=server.admin).status_code == 404
    assert _leftovers(server) == []


def test_more_variants_and_versions_accumulate(server: Harness, make_package: Callable[..., bytes]) -> None:
    for version, profile in [("1", "cpu-generic"), ("1", "x86_64-avx2"), ("2", "cpu-generic")]:
        assert server.upload(make_package(version=version, profile=profile)).status_code == 201
    [model] = server.client.get("/v1/models", headers=server.admin).json()
    assert [v["version"] for v in model["versions"]] == ["1", "2"]
    assert [v["id"] for v in model["versions"][0]["variants"]] == ["cpu-generic-fp32", "x86_64-avx2-fp32"]


def test_a_corrupted_tar_is_refused(server: Harness, make_package: Callable[..., bytes]) -> None:
    for body in (b"this is not a tar at all" * 100, make_package()[:2000]):
        response = server.upload(body)
        assert response.status_code == 422, response.text
        assert response.json()["code"] in ("package_invalid", "verification_failed")
    assert server.client.get("/v1/models", headers=server.admin).json() == []
    assert _leftovers(server) == []
    assert not any(p.is_file() for p in server.plane.settings.blobs_dir.rglob("*"))


def test_a_tampered_file_inside_the_tar_is_refused(server: Harness, make_package: Callable[..., bytes]) -> None:
    tar = bytearray(make_package())
    with tarfile.open(fileobj=io.BytesIO(bytes(tar))) as archive:
        member = archive.getmember(MODEL_NAME)
    tar[member.offset_data + member.size // 2] ^= 0xFF
    response = server.upload(bytes(tar))
    assert response.status_code == 422
    assert response.json()["code"] == "verification_failed"
    assert MODEL_NAME in response.json()["error"]
    assert _leftovers(server) == []


def test_packages_over_the_limit_are_refused(
    settings: ServerSettings, start_server: StartServer, make_package: Callable[..., bytes]
) -> None:
    tar = make_package()
    with start_server(replace(settings, max_package_bytes=len(tar) - 1)) as server:
        declared = server.upload(tar)
        assert declared.status_code == 413
        assert declared.json()["code"] == "payload_too_large"

        def pieces() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while streaming
            for start in range(0, len(tar), 4096):
                yield tar[start : start + 4096]

        streamed = server.client.post("/v1/packages", content=pieces(), headers=server.admin)
        assert streamed.status_code == 413
        assert _leftovers(server) == []


def test_unknown_models_and_versions_are_404(server: Harness, make_package: Callable[..., bytes]) -> None:
    server.upload(make_package())
    missing_model = server.client.get("/v1/models/nope", headers=server.admin)
    assert missing_model.status_code == 404
    assert missing_model.json() == {"error": "no model 'nope'", "code": "not_found"}
    missing_version = server.client.get("/v1/models/digits/versions/9", headers=server.admin)
    assert missing_version.status_code == 404
    assert missing_version.json()["error"] == "model 'digits' has no version '9'"
