"""A release-signed model that reads files on the node (issue 11, finding 2), against real processes.

The attack: an ONNX initializer whose external data location is `trust/node.key`, a relative path without `..`.
onnxruntime, given the model as bytes, resolves it against the agent's working directory; the package passed
digest verification, the golden check and probation, and inference returned the node's private key. Now a model may
use external data only from files its manifest lists (hashed with the package), checked before any runtime reads
it: at `strata model push` (build), `strata package verify`, upload to the control plane, and on the node, which
also hands onnxruntime the listed files from memory and an empty folder instead of its working directory.

The same attack through OpenVINO: given an ONNX model as the bytes of an "IR" (as the agent loads it), OpenVINO
picks its ONNX reader by content and resolves external data `node.key` against the working directory. An OpenVINO
package's model must be IR XML with a `net` root and no document type declaration (`check_openvino_ir`), checked at
`strata package verify` and `push`, at upload, and on the node.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

from strata.core.errors import PackageError
from strata.core.hashing import sha256_file
from strata.core.modelrefs import onnx_external_refs
from strata.core.package import GOLDEN_NAME, MODEL_NAME, FileEntry, GoldenSpec, Manifest, Package, TensorSpec, pack_tar
from strata.examples.digits import load_data
from strata.localfleet import LocalFleet
from strata.package_build import build_package, write_manifest
from strata.trust.release import sign_release
from strata.trust.signing import create_release_key

pytestmark = pytest.mark.slow

SECRET = "trust/node.key"
KEY_BYTES = 64


def leaking_model(location: str = SECRET, n: int = KEY_BYTES) -> bytes:
    """out = W * x, W (uint8 as float) read from external data at `location`: zeros for the golden input x=0, the
    file's bytes for x=1. The golden check cannot tell it from an honest model."""
    weights = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", str(n))):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["Wf", "x"], ["out"]),
        ],
        "leak",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [n])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def signed_leaking_package(
    folder: Path, key: Path, version: str, openvino_model: bytes | None = None
) -> tuple[Package, tuple[str, str]]:
    """The attacker's package, written by hand (strata's builder refuses the model) and signed with a real
    release key: an onnxruntime package with the leaking model, or an OpenVINO one whose model.xml (with a
    model.bin beside it) is `openvino_model`."""
    folder.mkdir(parents=True)
    if openvino_model is None:
        files = [(MODEL_NAME, "model")]
        (folder / MODEL_NAME).write_bytes(leaking_model())
    else:
        files = [("model.xml", "model"), ("model.bin", "weights")]
        (folder / "model.xml").write_bytes(openvino_model)
        (folder / "model.bin").write_bytes(bytes(16))
    golden = io.BytesIO()
    np.savez(golden, **{"input:x": np.zeros(1, np.float32), "output:out": np.zeros(KEY_BYTES, np.float32)})
    (folder / GOLDEN_NAME).write_bytes(golden.getvalue())
    entries = []
    for name, role in (*files, (GOLDEN_NAME, "golden")):
        sha, size = sha256_file(folder / name)
        entries.append(FileEntry(path=name, size=size, sha256=sha, role=role))
    runtime, profile = ("onnxruntime", "cpu-generic") if openvino_model is None else ("openvino", "intel-openvino")
    manifest = Manifest(
        name="digits",
        version=version,
        variant=f"{profile}-fp32",
        profile=profile,
        runtime=runtime,
        precision="fp32",
        model_file=files[0][0],
        inputs=(TensorSpec("x", "FP32", (1,)),),
        outputs=(TensorSpec("out", "FP32", (KEY_BYTES,)),),
        files=tuple(entries),
        golden=GoldenSpec(GOLDEN_NAME, 1e-3, 1e-4),
    )
    write_manifest(folder, manifest)
    signature = sign_release(folder, key, time.time(), 86400).to_base64()
    return Package(folder, manifest), signature


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return create_release_key(tmp_path / "keys")


@pytest.fixture
def signed_fleet(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[LocalFleet]:
    with LocalFleet(tmp_path / "fleet", poll_wait_s=5) as running:
        running.start_server(extra_args=["--release-key", str(keys[1])])
        yield running


def strata_cli(fleet: LocalFleet, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STRATA_SERVER": fleet.server_url, "STRATA_TOKEN": fleet.admin_token}
    env["STRATA_CA"] = str(fleet.ca_path)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    return subprocess.run(
        [sys.executable, "-m", "strata", *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def upload_signed(fleet: LocalFleet, tar: Path, signature: tuple[str, str]) -> httpx.Response:
    """POST a package tar straight to the upload API with its release signature, as an admin."""
    headers = {
        "Authorization": f"Bearer {fleet.admin_token}",
        "Content-Type": "application/x-tar",
        "X-Strata-Signature": signature[0],
        "X-Strata-Release-Role": signature[1],
    }
    return httpx.post(
        f"{fleet.server_url}/v1/packages", content=tar.read_bytes(), headers=headers, verify=fleet.tls(), timeout=60
    )


def test_the_walker_finds_external_data_wherever_onnx_can_hold_it() -> None:
    """Initializers, sparse initializers, Constant attributes, If subgraphs, model-local functions: the pure walker
    (no onnx import) finds the same references as onnx's own parser."""

    def external(name: str, location: str, dtype: int = TensorProto.FLOAT) -> TensorProto:
        tensor = TensorProto(name=name, data_type=dtype, dims=[2], data_location=TensorProto.EXTERNAL)
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        return tensor

    sparse = helper.make_sparse_tensor(
        external("sv", "sparse-values"), helper.make_tensor("si", TensorProto.INT64, [2], [0, 1]), [4]
    )
    branch = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=external("cv", "in-subgraph"))],
        "then",
        [],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])],
    )
    function = helper.make_function(
        "local", "f", [], ["y"], [helper.make_node("Constant", [], ["y"], value=external("fv", "in-function"))], []
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch)],
        "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])],
        [external("w", "weights.bin")],
        sparse_initializer=[sparse],
    )
    model = helper.make_model(graph, functions=[function])
    found = {(ref.tensor, ref.location) for ref in onnx_external_refs(model.SerializeToString())}
    assert found == {
        ("w", "weights.bin"),
        ("sv", "sparse-values"),
        ("cv", "in-subgraph"),  # reached twice (then and else), the same reference
        ("fv", "in-function"),
    }
    with pytest.raises(PackageError):
        onnx_external_refs(b"\x0a\xff\xff\xff\xff\x0f")  # a length past the end


def test_push_verify_and_upload_refuse_a_signed_model_that_reads_a_node_file(
    signed_fleet: LocalFleet, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    fleet = signed_fleet
    model = tmp_path / "leak.onnx"
    model.write_bytes(leaking_model())

    # `strata model push` builds the package: refused before onnxruntime sees the model (which would read
    # trust/node.key relative to wherever the push runs: here, a folder holding such a file).
    (tmp_path / "trust").mkdir()
    (tmp_path / SECRET).write_bytes(os.urandom(KEY_BYTES))
    pushed = strata_cli(
        fleet, "model", "push", str(model), "--name", "digits", "--version", "1", "--sign-key", str(keys[0]),
        cwd=tmp_path,
    )  # fmt: skip
    assert pushed.returncode != 0
    assert "trust/node.key" in pushed.stderr + pushed.stdout
    assert fleet.client.models() == []

    # The same package, written by hand and signed with the real release key.
    package, signature = signed_leaking_package(tmp_path / "pkg", keys[0], "1")
    tar = tmp_path / "leak.tar"
    pack_tar(package, tar)
    verified = strata_cli(fleet, "package", "verify", str(tar))
    assert verified.returncode != 0
    assert "not a file of this package" in verified.stderr + verified.stdout

    # Straight to the API, signature and all: 422 with the reason, nothing registered.
    response = upload_signed(fleet, tar, signature)
    assert response.status_code == 422, response.text
    assert "trust/node.key" in response.json()["error"]
    assert "not a file of this package" in response.json()["error"]
    assert fleet.client.models() == []


def test_a_node_refuses_such_a_package_before_loading_it_and_keeps_serving(
    signed_fleet: LocalFleet,
    keys: tuple[Path, Path],
    digits_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The node's own check, for a package that reached the registry without the server's (a registry filled by an
    older strata, or a compromised one): stored by the registry code with the check taken out, signed by the real
    release key, then deployed."""
    fleet = signed_fleet
    fleet.start_agent("edge-1", "device", {"site": "lab"}, extra_args=["--probation", "0"])
    fleet.wait_for(lambda: "edge-1" in fleet.nodes(), 30, "edge-1 to enroll")
    node = fleet.agents["edge-1"]
    assert (node.data_dir / SECRET).is_file()

    v1 = build_package(digits_onnx, tmp_path / "v1", name="digits", version="1")
    signature = sign_release(v1.path, keys[0], time.time(), 86400).to_base64()
    pack_tar(v1, tmp_path / "v1.tar")
    fleet.client.push_package(tmp_path / "v1.tar", signature=signature)
    fleet.client.deploy("digits", "1", {"site": "lab"})
    fleet.wait_for_versions({"edge-1": {"digits": "1"}})

    package, signature = signed_leaking_package(tmp_path / "pkg", keys[0], "2")
    fleet.stop_server()
    _register_without_the_check(fleet, keys[1], package, signature, monkeypatch)
    fleet.start_server(extra_args=["--release-key", str(keys[1])])
    fleet.client.deploy("digits", "2", {"site": "lab"})

    def reported() -> dict[str, object] | None:
        for failure in fleet.nodes()["edge-1"]["failures"]:
            if failure["model"] == "digits" and failure["version"] == "2":
                return dict(failure)
        return None

    failure = fleet.wait_for(reported, 90, "edge-1 to report why it refused digits 2")
    assert failure["kind"] == "package"
    assert "trust/node.key" in str(failure["reason"])
    assert fleet.nodes()["edge-1"]["models"] == {"digits": "1"}
    sample = load_data().test_x[:1]
    x = {"inputs": [{"name": "X", "datatype": "FP32", "shape": list(sample.shape), "data": sample.ravel().tolist()}]}
    answer = httpx.post(f"{node.serve_url}/v2/models/digits/infer", json=x, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"


def _register_without_the_check(
    fleet: LocalFleet, release_key: Path, package: Package, signature: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Store `package` in the (stopped) server's registry with its release signature, the way an upload did before
    the model check existed: the same registry code, in this process, with the check removed."""
    import strata.core.package as package_module
    from strata.control.plane import ControlPlane
    from strata.control.settings import ServerSettings
    from strata.trust.release import SignedRelease

    monkeypatch.setattr(package_module, "_check_model_on_disk", lambda folder, manifest: None, raising=False)
    plane = ControlPlane.build(ServerSettings(data_dir=fleet.server_dir, release_keys=(release_key,)))
    plane.start()
    try:
        buffer = io.BytesIO()
        pack_tar(package, buffer)
        plane.registry.add_package([buffer.getvalue()], signature=SignedRelease.from_base64(*signature))
    finally:
        plane.stop()


# IR XML that would pull a file in through an external entity, were an XML reader to expand one.
DOCTYPE_IR = b"""<?xml version="1.0"?>
<!DOCTYPE net [<!ENTITY key SYSTEM "node.key">]>
<net name="leak" version="11"><layers><layer id="0" name="x" type="Parameter" version="opset1">
<data shape="1" element_type="f32"/><output><port id="0" precision="FP32"><dim>1</dim></port></output>
</layer></layers><edges/><rt_info><key value="&key;"/></rt_info></net>
"""


def test_an_openvino_package_whose_model_is_not_ir_xml_is_refused_at_verify_push_upload_and_on_the_node(
    signed_fleet: LocalFleet, keys: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenVINO package whose model.xml is the leaking ONNX model with external data `node.key` (OpenVINO,
    given it as bytes the way the agent loads it, reads ./node.key and infers its bytes), and one whose IR XML
    declares a document type: each refused by `strata package verify` and `push`, by the upload API, and by a
    node the registry handed it to anyway (a registry filled without the check), which reports why."""
    fleet = signed_fleet
    refused = [
        (
            *signed_leaking_package(tmp_path / "onnx", keys[0], "2", openvino_model=leaking_model("node.key")),
            "not IR XML",
        ),
        (*signed_leaking_package(tmp_path / "doctype", keys[0], "3", openvino_model=DOCTYPE_IR), "document type"),
    ]
    for package, signature, reason in refused:
        tar = tmp_path / f"{package.manifest.version}.tar"
        pack_tar(package, tar)
        verified = strata_cli(fleet, "package", "verify", str(tar))
        assert verified.returncode != 0
        assert reason in verified.stderr + verified.stdout
        pushed = strata_cli(fleet, "package", "push", str(tar), "--unsigned")
        assert pushed.returncode != 0
        assert reason in pushed.stderr + pushed.stdout
        response = upload_signed(fleet, tar, signature)
        assert response.status_code == 422, response.text
        assert reason in response.json()["error"]
    assert fleet.client.models() == []

    # On the node: the ONNX "IR", in a registry that took it without the check, deployed to an OpenVINO node.
    fleet.start_agent("ov-1", "device", {"site": "lab"}, profile="intel-openvino", extra_args=["--probation", "0"])
    fleet.wait_for(lambda: "ov-1" in fleet.nodes(), 30, "ov-1 to enroll")
    package, signature, _ = refused[0]
    fleet.stop_server()
    _register_without_the_check(fleet, keys[1], package, signature, monkeypatch)
    fleet.start_server(extra_args=["--release-key", str(keys[1])])
    fleet.client.deploy("digits", "2", {"site": "lab"})

    def reported() -> dict[str, object] | None:
        return next((dict(f) for f in fleet.nodes()["ov-1"]["failures"] if f["version"] == "2"), None)

    failure = fleet.wait_for(reported, 60, "ov-1 to report why it refused digits 2", fleet.agents["ov-1"].process)
    assert failure["kind"] == "package", failure
    assert "not IR XML" in str(failure["reason"])
    assert fleet.nodes()["ov-1"]["models"] == {}
