"""Small models made in the tests (onnx.helper) and their data, for the optimization passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strata.core.profiles import get_profile
from strata.optimize.base import PassContext
from strata.optimize.data import Feeds


def _mlp(path: Path, seed: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "W1": rng.standard_normal((16, 32)).astype(np.float32) / 4,
        "B1": rng.standard_normal(32).astype(np.float32) / 10,
        "W2": rng.standard_normal((32, 4)).astype(np.float32) / 4,
        "B2": rng.standard_normal(4).astype(np.float32) / 10,
    }
    nodes = [
        helper.make_node("MatMul", ["X", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["h3"]),
        helper.make_node("Add", ["h3", "B2"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16 -> 32 -> 4 MLP with fixed random weights: inputs X [batch, 16], output scores [batch, 4]."""
    return _mlp(tmp_path_factory.mktemp("tiny") / "mlp.onnx")


@pytest.fixture(scope="session")
def tiny_feeds() -> Feeds:
    return Feeds({"X": np.random.default_rng(1).standard_normal((48, 16)).astype(np.float32)})


@pytest.fixture
def context(tiny_feeds: Feeds) -> PassContext:
    """Targets that make every pass apply: this ISA, the generic CPU, OpenVINO and a CUDA GPU."""
    targets = tuple(get_profile(p) for p in ("x86_64-avx2", "cpu-generic", "intel-openvino", "x86_64-cuda"))
    return PassContext(task="classification", host=get_profile("x86_64-avx2"), targets=targets, calibration=tiny_feeds)
