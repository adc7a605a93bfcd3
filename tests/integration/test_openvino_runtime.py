"""The agent serves OpenVINO packages (intel-openvino nodes): loaded from bytes, golden-checked, run."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from strata.agent.runtime import OpenVinoModel, load_and_check
from strata.core.errors import ModelLoadError, PackageBuildError
from strata.core.package import Package, TensorSpec, verify_package

# OpenVINO comes with the optimize extra, which the dev extra (`make test`) installs: these tests run everywhere the
# suite does, and the runtime imports it as strata does (telemetry off: strata.core.openvino_import).


def _matmul_ir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """An OpenVINO IR (f32 weights) of x @ w, and w: the products are not exact in bf16 (1.8 runs as 1.8007812)."""
    from strata.core.openvino_import import import_openvino

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
    return tmp_path / "mm.xml", weights


def _build(xml: Path, out: Path, precision: str) -> Package:
    from strata.optimize.packaging import build_openvino_package

    return build_openvino_package(
        xml,
        out,
        name="mm",
        version="1",
        profile="intel-openvino",
        precision=precision,
        variant=f"intel-openvino-openvino-{precision}",
        inputs=(TensorSpec("x", "FP32", (-1, 4)),),
        outputs=(TensorSpec("y", "FP32", (-1, 3)),),
        sample={"x": np.ones((2, 4), np.float32)},
        metrics={},
    )


def test_an_openvino_package_loads_checks_and_runs(tmp_path: Path) -> None:
    xml, weights = _matmul_ir(tmp_path)
    package = _build(xml, tmp_path / "pkg", "fp32")
    runtime = load_and_check(verify_package(package.path, package.digest))
    x = np.ones((2, 4), np.float32)
    assert np.allclose(runtime.run({"x": x})["y"], x @ weights)
    assert "openvino_telemetry" not in sys.modules or sys.modules["openvino_telemetry"] is None

    (package.path / "model.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError):
        load_and_check(package)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_an_openvino_variant_computes_in_f32_whatever_the_cpu_would_pick(tmp_path: Path, precision: str) -> None:
    # OpenVINO's CPU plugin picks bf16 by itself on a CPU with AVX512_BF16 or AMX; an fp32 variant (and the float
    # parts of an int8 one) must not. Read back from the compiled model, so it holds on every CPU.
    xml, weights = _matmul_ir(tmp_path)
    package = _build(xml, tmp_path / "pkg", precision)
    runtime = load_and_check(verify_package(package.path, package.digest))
    assert isinstance(runtime, OpenVinoModel)
    assert runtime.compiled_model.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    x = np.full((1, 4), 1.0 / 3, np.float32)
    assert np.allclose(runtime.run({"x": x})["y"], x @ weights, rtol=1e-6, atol=0)


def test_a_bf16_openvino_package_computes_in_bf16_or_is_refused_where_the_cpu_cannot(tmp_path: Path) -> None:
    from strata.core.openvino_import import import_openvino

    xml, weights = _matmul_ir(tmp_path)
    if "BF16" not in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(PackageBuildError, match="to run in f32, not bf16"):  # its golden data cannot be made
            _build(xml, tmp_path / "pkg", "bf16")
        return
    package = _build(xml, tmp_path / "pkg", "bf16")
    runtime = load_and_check(verify_package(package.path, package.digest))
    assert isinstance(runtime, OpenVinoModel)
    assert runtime.compiled_model.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
    got = runtime.run({"x": np.ones((1, 4), np.float32)})["y"]
    assert got[0, 0] == np.float32(1.8007812)  # 1.8 in bf16: not the f32 answer
    np.testing.assert_allclose(got, np.ones((1, 4), np.float32) @ weights, rtol=1e-2)


def test_an_openvino_variant_of_a_precision_it_cannot_compute_in_is_refused(tmp_path: Path) -> None:
    # fp16: OpenVINO's CPU plugin runs f16 only on CPUs that have it, and answers bf16 or f32 elsewhere.
    xml, _ = _matmul_ir(tmp_path)
    with pytest.raises(PackageBuildError, match="no OpenVINO inference precision for a 'fp16' variant"):
        _build(xml, tmp_path / "pkg", "fp16")
