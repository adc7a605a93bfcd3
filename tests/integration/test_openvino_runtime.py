"""The agent serves OpenVINO packages (intel-openvino nodes): loaded from bytes, golden-checked, run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from strata.agent.runtime import load_and_check
from strata.core.errors import ModelLoadError
from strata.core.package import TensorSpec, verify_package

# Not importorskip: a plain `import openvino` would load its telemetry, which strata keeps off.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="OpenVINO comes with the optimize extra"
)


def test_an_openvino_package_loads_checks_and_runs(tmp_path: Path) -> None:
    from strata.core.openvino_import import import_openvino
    from strata.optimize.packaging import build_openvino_package

    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mm.onnx")
    ov = import_openvino()
    ov.save_model(ov.convert_model(str(tmp_path / "mm.onnx")), str(tmp_path / "mm.xml"), compress_to_fp16=False)
    x = np.ones((2, 4), np.float32)
    package = build_openvino_package(
        tmp_path / "mm.xml",
        tmp_path / "pkg",
        name="mm",
        version="1",
        profile="intel-openvino",
        precision="fp32",
        variant="intel-openvino-openvino-fp32",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 3)),),
        sample={"x": x},
        metrics={},
    )
    runtime = load_and_check(verify_package(package.path, package.digest))
    assert np.allclose(runtime.run({"x": x})["y"], x @ weights)
    assert "openvino_telemetry" not in sys.modules or sys.modules["openvino_telemetry"] is None

    (package.path / "model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError):
        load_and_check(package)
