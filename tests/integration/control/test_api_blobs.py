"""Blob downloads: who may fetch which tar, full and ranged reads, and the headers a resuming agent relies on."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from control_harness import Harness, NodeCredentials


@pytest.fixture
def tar(make_package: Callable[..., bytes]) -> bytes:
    return make_package()


@pytest.fixture
def reader(server: Harness, tar: bytes) -> NodeCredentials:
    """A node whose desired state names the tar."""
    assert server.upload(tar).status_code == 201
    node = server.enroll("edge-1", {"site": "lab"})
    server.deploy("digits", "1", {"site": "lab"})
    return node


def _url(tar: bytes) -> str:
    return f"/v1/blobs/sha256/{hashlib.sha256(tar).hexdigest()}"


def test_full_download_with_its_headers(server: Harness, reader: NodeCredentials, tar: bytes) -> None:
    response = server.client.get(_url(tar), headers=reader.headers)
    assert response.status_code == 200
    assert response.content == tar
    assert response.headers["Content-Length"] == str(len(tar))
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"] == f'"sha256:{hashlib.sha256(tar).hexdigest()}"'
    head = server.client.head(_url(tar), headers=reader.headers)
    assert head.status_code == 200
    assert head.headers["Content-Length"] == str(len(tar))
    assert head.content == b""


def test_ranges_resume_a_download(server: Harness, reader: NodeCredentials, tar: bytes) -> None:
    have = 1000
    rest = server.client.get(_url(tar), headers={**reader.headers, "Range": f"bytes={have}-"})
    assert rest.status_code == 206
    assert rest.headers["Content-Range"] == f"bytes {have}-{len(tar) - 1}/{len(tar)}"
    assert rest.headers["Content-Length"] == str(len(tar) - have)
    assert tar[:have] + rest.content == tar

    middle = server.client.get(_url(tar), headers={**reader.headers, "Range": "bytes=10-19"})
    assert middle.status_code == 206
    assert middle.headers["Content-Range"] == f"bytes 10-19/{len(tar)}"
    assert middle.content == tar[10:20]


def test_a_range_past_the_end_is_416(server: Harness, reader: NodeCredentials, tar: bytes) -> None:
    response = server.client.get(_url(tar), headers={**reader.headers, "Range": f"bytes={len(tar)}-"})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == f"bytes */{len(tar)}"


def test_a_node_fetches_only_blobs_of_its_desired_state(
    server: Harness, reader: NodeCredentials, tar: bytes, make_package: Callable[..., bytes]
) -> None:
    outsider = server.enroll("edge-2", {"site": "shop"})
    assert server.client.get(_url(tar), headers=outsider.headers).status_code == 403
    other = make_package(version="2")
    server.upload(other)
    assert server.client.get(_url(other), headers=reader.headers).status_code == 403
    # The operator reads every blob.
    assert server.client.get(_url(other), headers=server.admin).content == other
    # Once deployed to the node, the new blob is readable by it; the old one no longer.
    server.deploy("digits", "2", {"site": "lab"})
    assert server.client.get(_url(other), headers=reader.headers).status_code == 200
    assert server.client.get(_url(tar), headers=reader.headers).status_code == 403


def test_unknown_or_malformed_blob_names(server: Harness, reader: NodeCredentials) -> None:
    assert server.client.get("/v1/blobs/sha256/" + "a" * 64, headers=server.admin).status_code == 404
    # a node learns nothing of a blob it may not read, not even whether it is stored (test_api_auth.py)
    assert server.client.get("/v1/blobs/sha256/" + "a" * 64, headers=reader.headers).status_code == 403
    assert server.client.get("/v1/blobs/sha256/../../admin.token", headers=server.admin).status_code == 404
    assert server.client.get("/v1/blobs/sha256/XYZ", headers=server.admin).status_code == 422


def test_a_relay_reads_only_the_site_packages_its_own_policy_allows(
    server: Harness, make_package: Callable[..., bytes]
) -> None:
    """A near-edge node reads the pieces of its site's devices' packages (it relays them), but it read those of a
    package whose placement policy forbids it too (here: another jurisdiction), weights and all. Now that
    package's manifest and pieces are refused to it, and asked whether a device may read it, it is told no; the
    device still reads it from the control plane."""
    eu_only = make_package(name="eu-only", policy={"allowed_jurisdictions": ["eu"]})
    anywhere = make_package(name="anywhere")
    for tar in (eu_only, anywhere):
        assert server.upload(tar).status_code == 201
    device = server.enroll("dev-eu", {"site": "s1", "jurisdiction": "eu"})
    relay = server.enroll("gw-us", {"site": "s1", "jurisdiction": "us"}, tier="near-edge")
    server.deploy("eu-only", "1", {"site": "s1"})
    server.deploy("anywhere", "1", {"site": "s1"})
    models = {m["name"]: m for m in server.desired(device).json()["models"]}
    assert "eu-only" not in {m["name"] for m in server.desired(relay).json()["models"]}
    for name, allowed in (("eu-only", False), ("anywhere", True)):
        digest = models[name]["variants"][0]["digest"].removeprefix("sha256:")
        manifest = server.client.get(f"/v1/blobs/sha256/{digest}", headers=relay.headers)
        assert (manifest.status_code == 200) is allowed, manifest.text
        assert server.client.get(f"/v1/blobs/sha256/{digest}", headers=device.headers).status_code == 200
        access = server.client.get(f"/v1/nodes/{device.node_id}/packages/{digest}", headers=relay.headers)
        assert (access.status_code == 204) is allowed, access.text
        if not allowed:
            assert "forbids this relay" in access.json()["error"]
