"""What a package's manifest and model bytes can make strata's parsers do (security review of session 7).

Findings 3-5: a manifest nested 100,000 deep, a listed path 1500 folders deep, or a tar header declaring 2**50 bytes
raised RecursionError or MemoryError (a 500 at upload, an unhandled error on a node); a runtime or precision strata
does not know reached the database; and onnxruntime, handed a model's bytes, took bytes in its own ORT format for
one. The upload path is tested against a real server in test_package_uploads.py; these are the parsers themselves,
where every caller (upload, `strata package verify`, the node's store and relay) meets them.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from strata.agent.store import ArtifactStore
from strata.core.errors import PackageError, VerificationError
from strata.core.package import (
    MAX_PATH_BYTES,
    MAX_PATH_PART_BYTES,
    MAX_PATH_PARTS,
    SCHEMA,
    Manifest,
    ort_session_in_memory,
    parse_manifest,
    safe_relative_path,
    unpack_tar,
)
from strata.core.profiles import PRECISIONS, RUNTIMES


def manifest_json(**changes: Any) -> dict[str, Any]:
    files = [{"path": p, "size": 1, "sha256": "a" * 64} for p in ("model.onnx", "golden.npz")]
    spec = {"name": "x", "datatype": "FP32", "shape": [1]}
    return {
        "schema": SCHEMA, "name": "m", "version": "1", "variant": "v", "profile": "cpu-generic",
        "runtime": "onnxruntime", "precision": "fp32", "model_file": "model.onnx", "inputs": [spec],
        "outputs": [{**spec, "name": "y"}], "files": files, "golden": {"file": "golden.npz", "rtol": 0, "atol": 0},
        **changes,
    }  # fmt: skip


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_a_manifest_nested_past_the_parser_is_a_package_error(tmp_path: Path) -> None:
    raw = json.dumps(manifest_json())
    deep = raw[:-1] + ', "notes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(PackageError, match="nested more than 32 levels"):
        parse_manifest(deep)
    digest = "sha256:" + hashlib.sha256(deep.encode()).hexdigest()
    with pytest.raises(VerificationError, match="nested more than 32 levels"):  # the node's store
        ArtifactStore(tmp_path).save_manifest(digest, deep.encode())


def test_nesting_is_bounded_at_32_levels() -> None:
    assert parse_manifest(json.dumps(manifest_json(metrics=nested(31)))).metrics == nested(31)
    with pytest.raises(PackageError, match="nested more than 32 levels"):
        Manifest.from_json(manifest_json(metrics=nested(32)))
    with pytest.raises(PackageError, match="not valid JSON"):
        parse_manifest(b"\xff\xfe{")


def test_paths_are_bounded_in_parts_and_bytes() -> None:
    safe_relative_path("/".join(["a"] * MAX_PATH_PARTS))
    safe_relative_path("a" * MAX_PATH_PART_BYTES)
    safe_relative_path("/".join(["b" * 200] * 5))
    with pytest.raises(PackageError, match="too long for a package"):
        safe_relative_path("/".join(["a"] * (MAX_PATH_PARTS + 1)))
    with pytest.raises(PackageError, match="too long for a package"):
        safe_relative_path("/".join(["a" * 200] * 6))  # 1205 bytes
    with pytest.raises(PackageError, match="longer than 255 bytes"):
        safe_relative_path("a" * (MAX_PATH_PART_BYTES + 1))
    with pytest.raises(PackageError, match="longer than 255 bytes"):
        safe_relative_path("é" * 128)  # 128 characters, 256 bytes
    assert MAX_PATH_BYTES == 1024
    files = [*manifest_json()["files"], {"path": "/".join(["a"] * 1500), "size": 1, "sha256": "b" * 64}]
    with pytest.raises(PackageError, match="too long for a package"):
        Manifest.from_json(manifest_json(files=files))


@pytest.mark.parametrize("size", [1 << 33, 1 << 50])
def test_a_tar_header_declaring_more_than_memory_is_a_package_error(tmp_path: Path, size: int) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = size
    raw = header.tobuf(format=tarfile.GNU_FORMAT) + b"20 path=manifest.json\n".ljust(512, b"\0") + bytes(1024)
    (tmp_path / "p.tar").write_bytes(raw)
    for source in (tmp_path / "p.tar", io.BytesIO(raw)):
        with pytest.raises(PackageError, match="not a readable tar"):
            unpack_tar(source, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_every_runtime_and_precision_strata_knows_is_accepted_and_no_other() -> None:
    for runtime in RUNTIMES:
        for precision in PRECISIONS:
            assert Manifest.from_json(manifest_json(runtime=runtime, precision=precision)).runtime == runtime
    with pytest.raises(PackageError, match=r"manifest runtime 'onnx' is not one of \['onnxruntime'"):
        Manifest.from_json(manifest_json(runtime="onnx"))
    with pytest.raises(PackageError, match=r"manifest precision 'x{64}' is not one of \['fp32'"):
        Manifest.from_json(manifest_json(precision="x" * 10_000))


def test_a_model_in_onnxruntime_s_own_format_does_not_load_from_bytes(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx_bytes = model.SerializeToString()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "m.ort")
    options.add_session_config_entry("session.save_model_format", "ORT")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    ort_bytes = (tmp_path / "m.ort").read_bytes()
    assert ort_bytes[4:8] == b"ORTM"
    feeds = {"x": np.ones(2, np.float32)}
    assert ort.InferenceSession(ort_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)  # ORT takes it
    with pytest.raises(Exception, match="protobuf parsing failed"):  # onnxruntime's own error type
        ort_session_in_memory(ort, ort_bytes, ort.SessionOptions(), None, ["CPUExecutionProvider"])
    session = ort_session_in_memory(ort, onnx_bytes, ort.SessionOptions(), None, ["CPUExecutionProvider"])
    assert session.run(None, feeds)[0].tolist() == [-1.0, -1.0]
