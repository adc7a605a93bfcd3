"""Small models made in the tests (onnx.helper) and their data, for the optimization passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strata.core.profiles import get_profile
from strata.optimize.base import PassContext
from strata.optimize.data import Feeds


def _mlp(path: Path, seed: int = 0) -> Path:
    from onnx import TensorProto, helper

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
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 16])]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4])]
    return _save(helper.make_graph(nodes, "tiny-mlp", inputs, outputs), weights, path)


def _save(graph: Any, weights: dict[str, np.ndarray], path: Path) -> Path:
    """`graph` (an onnx GraphProto) with `weights` as its initializers, checked and saved at `path` (opset 17)."""
    import onnx
    from onnx import helper, numpy_helper

    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
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


def _save_bert(nodes: list[Any], name: str, weights: dict[str, np.ndarray], width: int, path: Path) -> Path:
    """A BERT-shaped graph of `nodes`: inputs input_ids and attention_mask, output last_hidden_state."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", width])],
    )
    return _save(graph, weights, path)


def _tiny_bert(path: Path, seed: int = 0) -> Path:
    """One BERT layer as transformers exports it with SDPA attention: the padding mask becomes Where(mask, 0,
    -inf) added to the attention scores, LayerNormalization, and an erf-GELU feed-forward block whose hidden
    unit 0 is large (the outlier that transformer FFNs have)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    d, hidden, vocab = 16, 64, 50

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w1 = w(d, hidden)
    w1[:, 0] *= 25  # one FFN unit with a far wider range than the rest
    weights = {
        "E": w(vocab, d, scale=1.0), "g0": np.ones(d, np.float32), "b0": np.zeros(d, np.float32),
        "Wq": w(d, d), "Wk": w(d, d), "Wv": w(d, d), "Wo": w(d, d), "bo": w(d, scale=0.1),
        "g1": np.ones(d, np.float32), "b1n": np.zeros(d, np.float32),
        "W1": w1, "B1": w(hidden, scale=0.1), "W2": w(hidden, d, scale=0.2), "B2": w(d, scale=0.1),
        "g2": np.ones(d, np.float32), "b2n": np.zeros(d, np.float32),
        "scale": np.array(1 / np.sqrt(d), np.float32), "zero": np.array(0.0, np.float32),
        "neg_inf": np.array(-np.inf, np.float32), "axis1": np.array([1], np.int64),
        "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1.0, np.float32),
        "half": np.array(0.5, np.float32),
    }  # fmt: skip
    node = helper.make_node
    nodes = [
        node("Gather", ["E", "input_ids"], ["emb"]),
        node("LayerNormalization", ["emb", "g0", "b0"], ["x"], axis=-1),
        node("MatMul", ["x", "Wq"], ["q"]),
        node("MatMul", ["x", "Wk"], ["k"]),
        node("MatMul", ["x", "Wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["qk"]),
        node("Mul", ["qk", "scale"], ["scores"]),
        node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
        node("Unsqueeze", ["mask_bool", "axis1"], ["mask_rows"]),
        node("Where", ["mask_rows", "zero", "neg_inf"], ["mask_bias"]),
        node("Add", ["scores", "mask_bias"], ["masked"]),
        node("Softmax", ["masked"], ["probs"], axis=-1),
        node("MatMul", ["probs", "v"], ["ctx"]),
        node("MatMul", ["ctx", "Wo"], ["attn0"]),
        node("Add", ["attn0", "bo"], ["attn"]),
        node("Add", ["attn", "x"], ["res1"]),
        node("LayerNormalization", ["res1", "g1", "b1n"], ["h"], axis=-1),
        node("MatMul", ["h", "W1"], ["u0"]),
        node("Add", ["u0", "B1"], ["u"]),
        node("Div", ["u", "sqrt2"], ["u_scaled"]),
        node("Erf", ["u_scaled"], ["erf"]),
        node("Add", ["erf", "one"], ["erf1"]),
        node("Mul", ["u", "erf1"], ["gelu2"]),
        node("Mul", ["gelu2", "half"], ["gelu"]),
        node("MatMul", ["gelu", "W2"], ["f0"], name="ffn_down"),
        node("Add", ["f0", "B2"], ["f"]),
        node("Add", ["f", "h"], ["res2"]),
        node("LayerNormalization", ["res2", "g2", "b2n"], ["last_hidden_state"], axis=-1),
    ]
    return _save_bert(nodes, "tiny-bert", weights, d, path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One BERT-shaped layer (see `_tiny_bert`): inputs input_ids and attention_mask, output last_hidden_state."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny") / "bert.onnx")


@pytest.fixture(scope="session")
def tiny_bert_feeds() -> Feeds:
    """96 token sequences of 4 to 24 tokens, padded to 24 (mask 0 on the padding, as a tokenizer pads)."""
    rng = np.random.default_rng(2)
    count, width = 96, 24
    lengths = rng.integers(4, width + 1, count)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 50, (count, width)), 0).astype(np.int64)
    return Feeds({"input_ids": ids, "attention_mask": mask}, mask="attention_mask")


def _tiny_sdpa_bert(path: Path, seed: int = 0) -> Path:
    """One BERT layer with two attention heads as `transformers` exports SDPA: Q and K each scaled by
    sqrt(1/sqrt(head_dim)), Reshape/Transpose into heads, the padding mask as Where(mask, 0, -inf), IsNaN/Where
    after the Softmax, the heads merged back by Transpose and Reshape."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    d, heads, vocab = 16, 2, 50

    def w(*shape: int, scale: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {
        "E": w(vocab, d, scale=1.0), "g0": np.ones(d, np.float32), "b0": np.zeros(d, np.float32),
        "Wq": w(d, d), "bq": w(d, scale=0.1), "Wk": w(d, d), "bk": w(d, scale=0.1), "Wv": w(d, d),
        "bv": w(d, scale=0.1), "Wo": w(d, d), "bo": w(d, scale=0.1), "g1": np.ones(d, np.float32),
        "b1n": np.zeros(d, np.float32), "heads_shape": np.array([0, 0, heads, d // heads], np.int64),
        "merged_shape": np.array([0, 0, d], np.int64),
        "root_scale": np.array((d // heads) ** -0.25, np.float32), "zero": np.array(0.0, np.float32),
        "neg_inf": np.array(-np.inf, np.float32), "axes12": np.array([1, 2], np.int64),
    }  # fmt: skip
    node = helper.make_node
    nodes = [node("Gather", ["E", "input_ids"], ["emb"]), node("LayerNormalization", ["emb", "g0", "b0"], ["x"])]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [
            node("MatMul", ["x", f"W{name}"], [f"{name}0"]),
            node("Add", [f"b{name}", f"{name}0"], [f"{name}1"]),
            node("Reshape", [f"{name}1", "heads_shape"], [f"{name}2"]),
            node("Transpose", [f"{name}2"], [f"{name}3"], perm=perm),
        ]
    nodes += [
        node("Mul", ["q3", "root_scale"], ["qs"]),
        node("Mul", ["k3", "root_scale"], ["ks"]),
        node("MatMul", ["qs", "ks"], ["scores"]),
        node("Cast", ["attention_mask"], ["mask_bool"], to=TensorProto.BOOL),
        node("Unsqueeze", ["mask_bool", "axes12"], ["mask4"]),
        node("Where", ["mask4", "zero", "neg_inf"], ["mask_bias"]),
        node("Add", ["scores", "mask_bias"], ["masked"]),
        node("Softmax", ["masked"], ["probs"], axis=-1),
        node("IsNaN", ["probs"], ["nan"]),
        node("Where", ["nan", "zero", "probs"], ["probs_ok"]),
        node("MatMul", ["probs_ok", "v3"], ["ctx"]),
        node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        node("Reshape", ["ctx_t", "merged_shape"], ["ctx_m"]),
        node("MatMul", ["ctx_m", "Wo"], ["o0"]),
        node("Add", ["o0", "bo"], ["o"]),
        node("Add", ["o", "x"], ["res"]),
        node("LayerNormalization", ["res", "g1", "b1n"], ["last_hidden_state"]),
    ]
    return _save_bert(nodes, "tiny-sdpa-bert", weights, d, path)


@pytest.fixture(scope="session")
def tiny_sdpa_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One two-head BERT layer with attention as SDPA exports it (see `_tiny_sdpa_bert`); tiny_bert's interface."""
    return _tiny_sdpa_bert(tmp_path_factory.mktemp("tiny") / "sdpa-bert.onnx")
