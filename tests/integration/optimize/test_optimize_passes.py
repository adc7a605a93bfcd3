"""Each pass on a small model made in the test: what it writes, what the variant needs, and that it computes
(nearly) what the fp32 model computes."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strata.core.profiles import get_profile
from strata.optimize.base import Candidate, PassContext
from strata.optimize.data import Feeds
from strata.optimize.passes import (
    DynamicQuantizationPass,
    Float16Pass,
    FusedDynamicQuantizationPass,
    GraphOptimizationPass,
    OpenVinoPass,
    StaticQuantizationPass,
    passes_named,
)
from strata.optimize.pipeline import quantizer_output_to_log
from strata.optimize.runners import OpenVinoRunner, open_runner


def _op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _max_error(model: Path, candidate: Candidate, feeds: Feeds) -> float:
    reference = open_runner(model, "onnxruntime").run(feeds.arrays)["scores"]
    got = open_runner(candidate.model_path, candidate.runtime, precision=candidate.precision).run(feeds.arrays)[
        "scores"
    ]
    return float(np.max(np.abs(got - reference)) / np.max(np.abs(reference)))


def test_graph_levels_are_saved_and_layout_levels_are_tied_to_the_isa(
    tiny_mlp: Path, tmp_path: Path, context: PassContext, tiny_feeds: Feeds
) -> None:
    candidates = GraphOptimizationPass().apply(tiny_mlp, tmp_path, context)
    assert [c.id for c in candidates] == ["fp32-ort-basic", "fp32-ort-extended", "fp32-ort-layout", "fp32-ort-all"]
    by_id = {c.id: c for c in candidates}
    assert by_id["fp32-ort-basic"].profile == by_id["fp32-ort-extended"].profile == "cpu-generic"
    assert by_id["fp32-ort-all"].profile == by_id["fp32-ort-layout"].profile == "x86_64-avx2"
    assert "tied to that ISA" in by_id["fp32-ort-all"].notes[0]
    for candidate in candidates:
        assert candidate.error is None
        assert candidate.model_path.is_file()
        assert candidate.precision == "fp32"
        assert _max_error(tiny_mlp, candidate, tiny_feeds) < 1e-5
    # extended fuses MatMul+Add into onnxruntime's Gemm/FusedMatMul: the graph really was rewritten.
    assert _op_types(by_id["fp32-ort-extended"].model_path) != _op_types(tiny_mlp)


def test_dynamic_quantization_searches_all_eight_settings(
    tiny_mlp: Path, tmp_path: Path, context: PassContext, tiny_feeds: Feeds
) -> None:
    candidates = DynamicQuantizationPass().apply(tiny_mlp, tmp_path, context)
    assert sorted(c.id for c in candidates) == sorted(
        f"int8-dyn-{w}{pc}{rr}" for w in ("s8", "u8") for pc in ("", "-pc") for rr in ("", "-rr")
    )
    for candidate in candidates:
        assert candidate.error is None
        assert (candidate.profile, candidate.runtime, candidate.precision) == ("cpu-generic", "onnxruntime", "int8")
        assert candidate.passes[0].startswith("quant-pre-process")
        assert "MatMulInteger" in _op_types(candidate.model_path) or "DynamicQuantizeMatMul" in _op_types(
            candidate.model_path
        )
        error = _max_error(tiny_mlp, candidate, tiny_feeds)
        assert error < 0.25
        if candidate.id.endswith("-rr"):  # 7-bit weights cannot saturate the u8s8 kernels
            assert error < 0.05, candidate.id
    naive = next(c for c in candidates if c.id == "int8-dyn-s8")
    assert "weight_type=QInt8,per_channel=False,reduce_range=False" in naive.passes[1]


def test_static_quantization_writes_qdq_per_calibration_method(
    tiny_mlp: Path,
    tmp_path: Path,
    context: PassContext,
    tiny_feeds: Feeds,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="strata.optimize.pipeline")
    with quantizer_output_to_log():  # as `strata optimize` runs every pass
        candidates = StaticQuantizationPass().apply(tiny_mlp, tmp_path, context)
        logging.warning("Please consider to run pre-processing before quantization.")  # onnxruntime's, on root
    # The calibrators' prints and the quantizer's root-logger warnings went to the log at debug level: the
    # terminal shows strata's progress alone (they printed among its bars).
    assert capfd.readouterr() == ("", "")
    told = [r.getMessage() for r in caplog.records if r.name == "strata.optimize.pipeline"]
    assert "quantizer: Collecting tensor data and making histogram ..." in told
    assert "quantizer: Please consider to run pre-processing before quantization." in told
    assert {r.levelno for r in caplog.records if r.name == "strata.optimize.pipeline"} == {logging.DEBUG}
    assert [c.id for c in candidates] == ["int8-qdq-minmax", "int8-qdq-entropy", "int8-qdq-percentile"]
    for candidate in candidates:
        assert candidate.error is None, candidate.error
        assert {"QuantizeLinear", "DequantizeLinear"} <= _op_types(candidate.model_path)
        assert "reduce_range=True" in candidate.passes[1]  # x86-64 without VNNI
        assert _max_error(tiny_mlp, candidate, tiny_feeds) < 0.15


def test_static_quantization_of_a_transformer_keeps_the_mask_and_the_gelu_output_in_float(
    tiny_bert: Path, tmp_path: Path, context: PassContext, tiny_bert_feeds: Feeds
) -> None:
    """Quantized with the quantizer's defaults, the -inf of the attention mask's Where made MinMax's scales noise
    and the histogram calibrators refuse the range ("range of [-inf, inf] is not finite")."""
    import onnx

    from strata.optimize.measure import predict
    from strata.optimize.tasks import compare, get_task

    calibration, evaluation = tiny_bert_feeds.take(range(48)), tiny_bert_feeds.take(range(48, 96))
    bert_context = PassContext("embedding", context.host, context.targets, calibration)
    candidates = StaticQuantizationPass().apply(tiny_bert, tmp_path, bert_context)
    task = get_task("embedding")
    expected = predict(open_runner(tiny_bert, "onnxruntime"), evaluation, task, "last_hidden_state", 16)
    for candidate in candidates:
        assert candidate.error is None, candidate.error
        assert "ops=MatMul+Gemm,float_outputs,float_after_gelu=1" in candidate.passes[1]
        model = onnx.load(str(candidate.model_path))
        producer = {out: node.op_type for node in model.graph.node for out in node.output}
        quantized = [
            node
            for node in model.graph.node
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(producer.get(i) == "DequantizeLinear" for i in node.input)
        ]
        assert not {node.op_type for node in quantized} & {"Where", "LayerNormalization", "Gather", "Softmax"}
        matmuls = [node for node in quantized if node.op_type == "MatMul"]
        assert len(matmuls) == 7  # q, k, v, scores, context, output projection, FFN up; not FFN down
        assert "ffn_down" in {node.name for node in model.graph.node} - {node.name for node in matmuls}
        assert not {producer.get(node.output[0]) for node in model.graph.node if node.op_type == "QuantizeLinear"} & {
            "MatMul"
        }  # outputs stay float
        got = predict(open_runner(candidate.model_path, "onnxruntime"), evaluation, task, "last_hidden_state", 16)
        accuracy = compare(task, expected, got)
        assert accuracy["mean_cosine"] >= 0.99, (candidate.id, accuracy)
        assert accuracy["min_cosine"] >= 0.97, (candidate.id, accuracy)


def test_fp16_is_made_for_gpu_targets_only(tiny_mlp: Path, tmp_path: Path, context: PassContext) -> None:
    import onnx

    fp16 = Float16Pass()
    [candidate] = fp16.apply(tiny_mlp, tmp_path, context)
    assert (candidate.id, candidate.profile, candidate.runtime, candidate.precision) == (
        "fp16-x86_64-cuda", "x86_64-cuda", "onnxruntime-cuda", "fp16",
    )  # fmt: skip
    model = onnx.load(str(candidate.model_path))
    assert {t.data_type for t in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # signature kept
    cpu_only = PassContext("classification", context.host, (get_profile("cpu-generic"),), context.calibration)
    assert fp16.skip_reason(cpu_only) == "no target with a GPU runtime and fp16"


def test_openvino_converts_and_quantizes_with_nncf(
    tiny_mlp: Path,
    tmp_path: Path,
    context: PassContext,
    tiny_feeds: Feeds,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="strata")
    openvino = OpenVinoPass()
    assert openvino.skip_reason(context) is None
    with quantizer_output_to_log():  # as `strata optimize` runs every pass
        fp32, int8 = openvino.apply(tiny_mlp, tmp_path, context)
    # NNCF's progress bars and its logger (which printed to the stdout it was imported under, among strata's
    # progress bars, or into a buffer nobody read) go to strata's log; an error of NNCF's stays an error.
    nncf_log = logging.getLogger("nncf")
    nncf_log.warning("Dataset contains only 48 samples")
    nncf_log.error("Quantization failed")
    assert capfd.readouterr() == ("", "")
    told = {(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("strata")}
    assert any(message.startswith("quantizer: Statistics collection") for _, _, message in told), told
    assert ("strata.core.openvino_import", logging.DEBUG, "nncf: Dataset contains only 48 samples") in told
    assert ("strata.core.openvino_import", logging.ERROR, "nncf: Quantization failed") in told
    assert (fp32.id, int8.id) == ("ov-fp32", "ov-int8")
    assert int8.error is None, int8.error
    for candidate in (fp32, int8):
        assert (candidate.profile, candidate.runtime) == ("x86_64-avx2", "openvino")  # the first that lists it
        assert all(path.is_file() for path in candidate.files)
    assert "FakeQuantize" in int8.model_path.read_text() or "FakeConvert" in int8.model_path.read_text()
    assert _max_error(tiny_mlp, fp32, tiny_feeds) < 1e-4
    assert _max_error(tiny_mlp, int8, tiny_feeds) < 0.35
    for candidate in (fp32, int8):  # f32 on every CPU: OpenVINO would pick bf16 by itself where the CPU has it
        runner = open_runner(candidate.model_path, candidate.runtime, precision=candidate.precision)
        assert isinstance(runner, OpenVinoRunner)
        assert runner.compiled_model.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    no_openvino = PassContext("classification", context.host, (get_profile("cpu-generic"),), context.calibration)
    assert openvino.skip_reason(no_openvino) == "no target lists the openvino runtime"


def test_openvino_bf16_is_the_fp32_ir_computing_in_bf16_where_the_cpu_has_it(
    tiny_mlp: Path, tmp_path: Path, context: PassContext, tiny_feeds: Feeds
) -> None:
    from strata.core.openvino_import import import_openvino
    from strata.optimize.base import PassContext as Context

    bf16_host = Context("classification", context.host, (get_profile("x86_64-avx512-bf16"),), context.calibration)
    candidates = {c.id: c for c in OpenVinoPass().apply(tiny_mlp, tmp_path, bf16_host)}
    bf16 = candidates["ov-bf16"]
    assert (bf16.profile, bf16.runtime, bf16.precision) == ("x86_64-avx512-bf16", "openvino", "bf16")
    assert bf16.model_path == candidates["ov-fp32"].model_path
    assert "ov-bf16" not in {c.id for c in OpenVinoPass().apply(tiny_mlp, tmp_path / "no-bf16", context)}
    # Both branches are the CPU's business: OpenVINO computes bf16 only where the CPU has it, and says f32
    # elsewhere, which the runner refuses rather than time an f32 run under a bf16 label.
    if "BF16" in import_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        runner = open_runner(bf16.model_path, "openvino", precision="bf16")
        assert isinstance(runner, OpenVinoRunner)
        assert runner.compiled_model.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"
        assert 0 < _max_error(tiny_mlp, bf16, tiny_feeds) < 0.02  # rounded like bf16, not exact
    else:
        from strata.core.errors import OptimizationError

        with pytest.raises(OptimizationError, match="to run in f32, not bf16"):
            open_runner(bf16.model_path, "openvino", precision="bf16")


def test_openvino_is_never_allowed_to_load_its_telemetry(tiny_mlp: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from strata.core.openvino_import import import_nncf; import_nncf();"
        "print(sorted(m for m in sys.modules if m.startswith('openvino_telemetry') and sys.modules[m] is not None))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr  # OpenVINO and NNCF are dev dependencies: installed wherever this runs
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_pass_names_select_a_subset_in_the_default_order() -> None:
    from strata.core.errors import ConfigError

    assert [p.name for p in passes_named(["static", "graph"])] == ["graph", "static"]
    assert [p.name for p in passes_named(None)] == ["graph", "fp16", "dynamic", "dynamic-fused", "static", "openvino"]
    with pytest.raises(ConfigError, match="unknown pass"):
        passes_named(["magic"])


def test_fp16_keeps_a_cast_from_int64_to_float_so_onnxruntime_loads_it(tmp_path: Path, context: PassContext) -> None:
    """An int64 input cast to float feeding MatMul and Add (as a transformer's attention mask is): the converter
    alone types the cast's output fp16 while the cast still makes float, and onnxruntime refuses the model."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_float"], to=TensorProto.FLOAT),  # nameless, as often exported
            helper.make_node("MatMul", ["ids_float", "W"], ["h"], name="matmul"),
            helper.make_node("Add", ["h", "B"], ["out"], name="add"),
        ],
        "cast-int64",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "cast.onnx"))
    [candidate] = Float16Pass().apply(tmp_path / "cast.onnx", tmp_path, context)
    assert candidate.error is None
    ids = rng.integers(0, 50, (8, 4), dtype=np.int64)
    fp32 = ort.InferenceSession(str(tmp_path / "cast.onnx"), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(str(candidate.model_path), providers=["CPUExecutionProvider"])
    [expected], [got] = fp32.run(None, {"ids": ids}), fp16.run(None, {"ids": ids})
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-2, atol=0.1)


@pytest.mark.parametrize(
    ("model", "attention"),
    [
        ("tiny_bert", "sdpa-attention: none found"),  # single-head, no Reshape into heads: left to onnxruntime
        ("tiny_sdpa_bert", "sdpa-attention: 1 rewritten into Attention"),
    ],
)
def test_transformer_fusion_then_dynamic_int8_keeps_the_interface_and_passes_the_gate(
    model: str, attention: str, tmp_path: Path, context: PassContext, tiny_bert_feeds: Feeds,
    request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    import onnx

    from strata.optimize.gate import parse_gate
    from strata.optimize.measure import predict
    from strata.optimize.tasks import compare, get_task

    path: Path = request.getfixturevalue(model)
    bert_context = PassContext("embedding", context.host, context.targets, tiny_bert_feeds.take(range(48)))
    [candidate] = FusedDynamicQuantizationPass().apply(path, tmp_path, bert_context)
    assert candidate.error is None, candidate.error
    # the context's host is AVX2 without VNNI: 7-bit weights, as full-range ones saturate its u8s8 kernels
    assert (candidate.id, candidate.profile) == ("int8-dyn-fused-s8-pc-rr", "cpu-generic")
    assert "transformer-fusion:bert" in candidate.passes
    assert "SkipLayerNormalization x" in candidate.notes[0]
    assert "written back as Add + LayerNormalization" in candidate.notes[0]
    assert candidate.notes[1].startswith(attention), candidate.notes
    ops = _op_types(candidate.model_path)
    assert "SkipLayerNormalization" not in ops
    assert "LayerNormalization" in ops
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert ("QAttention" in ops) == ("rewritten" in attention)  # Q, K and V projected in one int8 GEMM
    original, fused = onnx.load(str(path)).graph, onnx.load(str(candidate.model_path)).graph
    for kind in ("input", "output"):
        assert [(v.name, v.type) for v in getattr(fused, kind)] == [(v.name, v.type) for v in getattr(original, kind)]
    task, evaluation = get_task("embedding"), tiny_bert_feeds.take(range(48, 96))  # padded, batches of 16
    expected = predict(open_runner(path, "onnxruntime"), evaluation, task, "last_hidden_state", 16)
    got = predict(open_runner(candidate.model_path, "onnxruntime"), evaluation, task, "last_hidden_state", 16)
    accuracy = compare(task, expected, got)
    assert parse_gate(task.default_gate).failures(dict(accuracy)) == [], accuracy


def test_transformer_fusion_skips_a_graph_with_no_transformer_block(
    tiny_mlp: Path, tmp_path: Path, context: PassContext
) -> None:
    from strata.optimize.base import PassNotApplicable

    with pytest.raises(PassNotApplicable, match="recognised no transformer block"):
        FusedDynamicQuantizationPass().apply(tiny_mlp, tmp_path, context)
    assert not list(tmp_path.glob("int8-*.onnx"))


def test_an_attention_rewrite_that_changes_the_outputs_is_not_used(
    tiny_sdpa_bert: Path, tmp_path: Path, tiny_bert_feeds: Feeds
) -> None:
    """The pattern matches any mask bias computed from the mask input; one that masks the tokens, not the padding,
    makes Attention (which keeps tokens where the mask is 1) compute something else, and the check says so."""
    import onnx

    from strata.optimize.passes.fusion import rewrite_sdpa_attention

    model = onnx.load(str(tiny_sdpa_bert))
    where = next(n for n in model.graph.node if n.output[0] == "mask_bias")
    where.input[1], where.input[2] = where.input[2], where.input[1]
    inverted = tmp_path / "inverted.onnx"
    onnx.save(model, str(inverted))
    used, note = rewrite_sdpa_attention(inverted, tmp_path / "rewritten.onnx", tiny_bert_feeds)
    assert used == inverted
    assert note.startswith("sdpa-attention: 1 found, not used (outputs differ by"), note
    used, note = rewrite_sdpa_attention(tiny_sdpa_bert, tmp_path / "rewritten.onnx", tiny_bert_feeds)
    assert used == tmp_path / "rewritten.onnx", note


def _skip_layer_norm(bias: bool, rng: np.random.Generator) -> Any:
    """One SkipLayerNormalization over [1, 3, 8]: with a bias and its input+skip+bias sum as an output, or bare."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = 8
    names = ("g", "b", "bias") if bias else ("g", "b")
    weights = [numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), n) for n in names]
    tensor = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, hidden]) for n in ("x", "skip", "y", "sum")}
    outputs = ["y", "", "", "sum"] if bias else ["y"]
    node = helper.make_node(
        "SkipLayerNormalization", ["x", "skip", *names], outputs, domain="com.microsoft", epsilon=1e-5
    )
    graph = helper.make_graph([node], "sln", [tensor["x"], tensor["skip"]], [tensor[n] for n in outputs if n], weights)
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )


@pytest.mark.parametrize("bias", [False, True])
def test_skip_layer_norm_is_written_back_as_add_and_layer_norm_and_sessions_do_not_fuse_it_again(
    bias: bool, tmp_path: Path
) -> None:
    # onnxruntime's CPU SkipLayerNormalization is a scalar loop, slower than Add + LayerNormalization: strata's
    # fused graphs and CPU sessions keep the two (MiniLM's fused int8 variant: 1.96x -> 2.94x fp32 at batch 1).
    import onnx
    import onnxruntime as ort

    from strata.core.package import ort_disabled_optimizers
    from strata.optimize.passes.fusion import split_skip_layer_norm

    rng = np.random.default_rng(0)
    model = _skip_layer_norm(bias, rng)
    feeds = {name: rng.standard_normal((1, 3, 8)).astype(np.float32) for name in ("x", "skip")}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    assert split_skip_layer_norm(model) == 1
    assert [n.op_type for n in model.graph.node] == ["Add", "Add", "LayerNormalization"][(0 if bias else 1) :]
    onnx.save(model, tmp_path / "split.onnx")
    providers = ["CPUExecutionProvider"]
    # the bare Add + LayerNormalization is what a session fuses again, unless told not to
    for disabled, fused_again in (([], not bias), (ort_disabled_optimizers(providers), False)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "seen.onnx")
        session = ort.InferenceSession(
            str(tmp_path / "split.onnx"), options, providers=providers, disabled_optimizers=disabled
        )
        ops = {n.op_type for n in onnx.load(str(tmp_path / "seen.onnx")).graph.node}
        assert ("SkipLayerNormalization" in ops) == fused_again, (disabled, ops)
        for got, want in zip(session.run(None, feeds), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert ort_disabled_optimizers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == []
