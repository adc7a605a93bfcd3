"""A classifier whose compute is set by its depth, for latency experiments: `layers` dense tanh layers.

Same signature as the digits example (`X` FP32 [-1, 64] -> `label` INT64 [-1], `probabilities` FP32 [-1, 10]), so
the same requests work on both. Each input row is spread over `replicas` rows that go through the layers together
(a batched MatMul on weights that stay in cache) and are averaged at the end, so compute grows with `layers` x
`replicas` while the file stays small. Three times the layers is about three times the compute: a real slower
model, not a sleep. Needs the `onnx` package (the `demo` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from strata.core.errors import ConfigError
from strata.core.fsutil import write_bytes_atomic


def build_compute_model(out: Path, layers: int, width: int = 128, replicas: int = 64, seed: int = 0) -> None:
    """Write an ONNX model with `layers` [width x width] MatMul + Tanh layers between a 64-wide input and 10 classes.

    Raises:
        ConfigError: onnx is not installed, or `layers`, `width` or `replicas` are not positive.
    """
    if layers < 1 or width < 1 or replicas < 1:
        raise ConfigError("a compute model needs at least one layer, of positive width, with positive replicas")
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        raise ConfigError("the compute example needs onnx: pip install 'strata[demo]'") from exc
    rng = np.random.default_rng(seed)

    def weight(name: str, rows: int, cols: int) -> object:
        return numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), name)

    initializers = [
        weight("w_in", 64, width),
        numpy_helper.from_array(np.array([0, 1, width], dtype=np.int64), "one_row"),
        numpy_helper.from_array(np.array([1, replicas, 1], dtype=np.int64), "spread"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["X", "w_in"], ["first"]),
        helper.make_node("Reshape", ["first", "one_row"], ["rows"]),  # [b, 1, width]
        helper.make_node("Tile", ["rows", "spread"], ["h0"]),  # [b, replicas, width]
    ]
    for i in range(layers):
        initializers.append(weight(f"w{i}", width, width))
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    initializers.append(weight("w_out", width, 10))
    nodes += [
        helper.make_node("ReduceMean", [f"h{layers}"], ["mean"], axes=[1], keepdims=0),  # [b, width]
        helper.make_node("MatMul", ["mean", "w_out"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label_2d"], axis=1, keepdims=1),
        helper.make_node("Squeeze", ["label_2d", "axis1"], ["label"]),
    ]
    graph = helper.make_graph(
        nodes,
        f"compute{layers}x{width}",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10]),
        ],
        initializers,  # type: ignore[arg-type]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_bytes_atomic(out, model.SerializeToString())
