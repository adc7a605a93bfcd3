"""What a node checks when it loads a package, before the version serves: that the model is what its manifest
declares (a package whose manifest lied about an output was activated, passed its golden check, recorded from the
same model, and then failed every request with a 500), and that its golden check ends (a model that never did held
the agent's reconciler, and a core, for good)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from strata.agent.runtime import OnnxRuntimeModel, load_and_check, signature_mismatches
from strata.core.errors import ModelLoadError
from strata.core.package import Package, TensorSpec
from strata.package_build import build_package, write_manifest


def double_model(path: Path) -> Path:
    """X float [N, 4] -> Y double [N, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["X"], ["Y"], to=TensorProto.DOUBLE)],
        "widen",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.DOUBLE, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_manifest_that_lies_about_an_output_is_refused_at_load(tmp_path: Path) -> None:
    model = double_model(tmp_path / "widen.onnx")
    package = build_package(model, tmp_path / "pkg", name="widen", version="1", sample={"X": np.ones((2, 4), "f4")})
    manifest = package.manifest
    assert manifest.outputs == (TensorSpec("Y", "FP64", (-1, 4)),)
    assert isinstance(load_and_check(package), OnnxRuntimeModel)  # the truth loads
    lying = Package(package.path, dataclasses.replace(manifest, outputs=(TensorSpec("Y", "FP32", (-1, 4)),)))
    with pytest.raises(ModelLoadError, match=r"does not match its manifest: output 'Y' is FP64 in the model, FP32"):
        load_and_check(lying)
    wider = Package(package.path, dataclasses.replace(manifest, inputs=(TensorSpec("X", "FP32", (-1, 4, 1)),)))
    with pytest.raises(ModelLoadError, match=r"input 'X' has shape \[-1, 4\] in the model, \[-1, 4, 1\]"):
        load_and_check(wider)
    renamed = Package(package.path, dataclasses.replace(manifest, inputs=(TensorSpec("x", "FP32", (-1, 4)),)))
    with pytest.raises(ModelLoadError, match=r"input 'x' is not one of the model's; model input 'X' is not in"):
        load_and_check(renamed)


def test_package_verify_runs_the_model_as_a_node_would(tmp_path: Path) -> None:
    """`strata package verify` said ok to a package every node refuses (its hashes all match): it now loads the
    model and replays the golden inputs too, where this machine has the runtime, and exits 5 as for bad hashes."""
    model = double_model(tmp_path / "widen.onnx")
    package = build_package(model, tmp_path / "pkg", name="widen", version="1", sample={"X": np.ones((2, 4), "f4")})
    verify = [sys.executable, "-m", "strata", "package", "verify"]
    good = subprocess.run([*verify, str(package.path)], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "onnxruntime loads the model as its manifest declares it and the golden outputs match" in good.stderr
    assert good.stdout.strip() == package.digest
    # the same package with an honest hash of a manifest that lies about the output's type
    write_manifest(package.path, dataclasses.replace(package.manifest, outputs=(TensorSpec("Y", "FP32", (-1, 4)),)))
    lying = subprocess.run([*verify, str(package.path)], capture_output=True, text=True, timeout=120)
    assert lying.returncode == 5, lying.stderr
    assert "every file matches its hash" in lying.stderr
    assert "a node would refuse this package" in lying.stderr
    assert "output 'Y' is FP64 in the model, FP32 in the manifest" in lying.stderr
    hashes_only = subprocess.run([*verify, str(package.path), "--no-run"], capture_output=True, text=True, timeout=120)
    assert hashes_only.returncode == 0, hashes_only.stderr
    assert "golden" not in hashes_only.stderr


def test_what_a_manifest_may_and_may_not_say_of_a_models_signature() -> None:
    model = [("X", "tensor(float)", ("N", 4)), ("M", "tensor(int64)", (None, 4))]
    same = (TensorSpec("X", "FP32", (-1, 4)), TensorSpec("M", "INT64", (-1, 4)))
    assert signature_mismatches(same, model, "input") == []
    fixed = (TensorSpec("X", "FP32", (1, 4)), TensorSpec("M", "INT64", (8, 4)))  # fixing a dynamic dim: fine
    assert signature_mismatches(fixed, model, "input") == []
    loose = (TensorSpec("X", "FP32", (-1, -1)), TensorSpec("M", "INT64", (-1, 5)))
    assert signature_mismatches(loose, model, "input") == [
        "input 'X' has shape [-1, 4] in the model, [-1, -1] in the manifest",
        "input 'M' has shape [-1, 4] in the model, [-1, 5] in the manifest",
    ]
    assert signature_mismatches(same[:1], model, "input") == ["model input 'M' is not in the manifest"]
    # an output the manifest leaves out is simply not served; a shape the model does not know is not checked
    assert signature_mismatches(same[:1], model, "output") == []
    assert signature_mismatches((TensorSpec("Y", "FP16", (2, 2)),), [("Y", "tensor(float16)", ())], "output") == []
    assert signature_mismatches((TensorSpec("Y", "FP32", ()),), [("Y", "seq(tensor(float))", ())], "output") == [
        "output 'Y' is seq(tensor(float)) in the model, FP32 in the manifest"
    ]


def never_ending_model() -> bytes:
    """X float [N, 4] -> Y: a Loop whose trip count is 10^15, each turn copying X."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "turn",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "c", "X"], ["Y"], body=body)],
        "forever",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        initializer=[
            numpy_helper.from_array(np.array(10**15, np.int64), "M"),
            numpy_helper.from_array(np.array(True), "c"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_a_golden_check_that_never_ends_fails_the_version_at_its_bound(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "copy",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "copy.onnx")
    package = build_package(tmp_path / "copy.onnx", tmp_path / "pkg", name="copy", version="1")
    runtime = load_and_check(package, check_timeout_s=1.0)  # an honest model's check ends well within it
    assert isinstance(runtime, OnnxRuntimeModel)
    feeds = {"X": np.arange(8, dtype=np.float32).reshape(2, 4)}
    np.testing.assert_array_equal(runtime.run_within(feeds, ["Y"], 1.0)["Y"], feeds["X"])
    # the same golden inputs and outputs, a model that never answers them (its signature is the same)
    package.model_path.write_bytes(never_ending_model())
    with pytest.raises(
        ModelLoadError, match=r"health check failed: golden run failed: the model did not finish in 1 s"
    ):
        load_and_check(package, check_timeout_s=1.0)
