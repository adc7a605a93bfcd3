"""Transformer fusion, then dynamic int8: onnxruntime's transformer optimizer before quantization.

`onnxruntime.transformers.optimizer.optimize_model(model_type="bert")` rewrites the subgraphs it recognises into
onnxruntime's contrib operators (Attention, BiasGelu, EmbedLayerNormalization; not SkipLayerNormalization, whose
CPU kernel is slower than the Add and LayerNormalization it would replace), and
dynamic quantization then turns a fused Attention into QAttention (its Q, K and V projections in one int8 GEMM).
Attention blocks as PyTorch's SDPA exports them, which that optimizer does not know, are rewritten into
Attention first (`strata.optimize.passes.attention`) and kept only when the rewritten graph computes what the
original does on calibration samples (with their padding). Only onnxruntime's Python-level fusions run
(opt_level 0): its level 1 and up import torch, which strata does not carry. Without sympy the optimizer's
symbolic shape inference is switched off, as quantization pre-processing does. A graph in which no transformer
block is recognised is not this pass's business: the pass says so and builds nothing, so a CNN or an MLP gets
no second copy of the plain dynamic variants.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strata.core.errors import OptimizationError
from strata.optimize.base import Candidate, PassContext, PassNotApplicable, external_data_files, save_onnx
from strata.optimize.data import Feeds
from strata.optimize.passes.attention import fuse_sdpa_attention
from strata.optimize.passes.dynamic import int8_skip_reason, quantize_grid
from strata.optimize.passes.quantize import needs_reduce_range, preprocess

FUSED_NAME = "fused.onnx"
SDPA_NAME = "sdpa-attention.onnx"
CHECK_SAMPLES = 16
CHECK_TOLERANCE = 1e-3  # largest difference allowed, relative to the largest output value
# Fusions that only a transformer block yields; BiasGelu or a lone LayerNormalization alone do not make a graph one.
TRANSFORMER_FUSIONS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization")


def fusion_summary(stats: Mapping[str, int]) -> tuple[bool, str]:
    """Whether the optimizer's fused-operator counts show a transformer, and a one-line account of them. Pure."""
    fused = {op: n for op, n in stats.items() if n}
    recognised = any(fused.get(op) for op in TRANSFORMER_FUSIONS)
    done = ", ".join(f"{op} x{n}" for op, n in sorted(fused.items())) or "nothing"
    missing = [op for op in ("Attention", "MultiHeadAttention") if not fused.get(op)]
    note = f"transformer fusion: {done}"
    if recognised and len(missing) == 2:
        note += "; attention not fused (its subgraph is not a pattern onnxruntime's optimizer knows)"
    return recognised, note


def _signature(path: Path) -> list[tuple[str, int, str]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        (kind, value.type.tensor_type.elem_type, value.name)
        for kind, values in (("input", graph.input), ("output", graph.output))
        for value in values
        if value.name not in {init.name for init in graph.initializer}
    ]


def fuse_transformer(model_path: Path, out: Path) -> str:
    """Write `model_path` with onnxruntime's BERT fusions applied to `out`; returns the account of what fused.

    Raises:
        PassNotApplicable: no transformer block was recognised.
        OptimizationError: the optimizer fails, or its graph's inputs or outputs differ from the model's.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_shape_inference = importlib.util.find_spec("sympy") is not None
    try:
        optimized = optimize_model(
            str(model_path),
            model_type="bert",
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=options,
        )
        stats = optimized.get_fused_operator_statistics()
    except Exception as exc:  # onnx / onnxruntime errors from the optimizer
        raise OptimizationError(f"onnxruntime's transformer optimizer failed: {exc}") from exc
    recognised, note = fusion_summary(stats)
    if not recognised:
        raise PassNotApplicable(
            f"onnxruntime's transformer optimizer recognised no transformer block in this graph "
            f"(none of {', '.join(TRANSFORMER_FUSIONS)} fused; {note})"
        )
    unfused = split_skip_layer_norm(optimized.model)
    if unfused:
        note += f"; SkipLayerNormalization x{unfused} written back as Add + LayerNormalization"
    optimized.save_model_to_file(str(out), use_external_data_format=bool(external_data_files(model_path)))
    if _signature(out) != _signature(model_path):
        raise OptimizationError(f"the fused graph changed the model's inputs or outputs: {_signature(out)}")
    return note


def split_skip_layer_norm(model: Any) -> int:
    """Rewrite every SkipLayerNormalization of `model` (an onnx ModelProto, in place) whose mean and inverse
    standard deviation outputs nothing reads into Add (input + bias, + skip) and LayerNormalization over the last
    axis; returns how many. onnxruntime's CPU kernel of the fused operator is slower than the two (see
    `strata.core.package.ort_disabled_optimizers`, which keeps sessions from fusing them again)."""
    from onnx import helper

    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    nodes, count = [], 0
    for node in graph.node:
        outputs = list(node.output) + [""] * (4 - len(node.output))
        if (
            node.op_type != "SkipLayerNormalization"
            or node.domain != "com.microsoft"
            or read & set(outputs[1:3]) - {""}
        ):
            nodes.append(node)
            continue
        x, skip, gamma = node.input[:3]
        beta = node.input[3] if len(node.input) > 3 else ""
        bias = node.input[4] if len(node.input) > 4 else ""
        base = node.name or outputs[0]
        total = outputs[3] or f"{base}/sum"
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        if bias:  # the bias first: onnxruntime folds an Add of a bias after a quantized MatMul into the MatMul
            nodes.append(helper.make_node("Add", [x, bias], [f"{base}/input_bias"], name=f"{base}/add_bias"))
            nodes.append(helper.make_node("Add", [f"{base}/input_bias", skip], [total], name=f"{base}/add"))
        else:
            nodes.append(helper.make_node("Add", [x, skip], [total], name=f"{base}/add"))
        norm_inputs = [total, gamma] + ([beta] if beta else [])
        nodes.append(
            helper.make_node(
                "LayerNormalization", norm_inputs, [outputs[0]], name=f"{base}/layer_norm", axis=-1, epsilon=epsilon
            )
        )
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _max_relative_error(original: Path, rewritten: Path, feeds: Feeds) -> float:
    import numpy as np

    from strata.optimize.runners import open_runner

    sample = feeds.batch(0, min(CHECK_SAMPLES, len(feeds)))
    expected = open_runner(original, "onnxruntime", 1).run(sample)
    got = open_runner(rewritten, "onnxruntime", 1).run(sample)
    worst = 0.0
    for name, reference in expected.items():
        scale = max(float(np.max(np.abs(reference))), 1e-12)
        worst = max(worst, float(np.max(np.abs(np.asarray(got[name]) - reference))) / scale)
    return worst


def rewrite_sdpa_attention(model_path: Path, out: Path, feeds: Feeds) -> tuple[Path, str]:
    """`model_path` with its SDPA attention blocks as Attention, written to `out`, when it has such blocks and the
    rewrite computes what the original does on `feeds`; else `model_path` itself. Returns the model and what
    happened.

    Raises:
        OptimizationError: the rewritten model does not load or run.
    """
    import onnx

    model = onnx.load(str(model_path))
    count = fuse_sdpa_attention(model)
    if count == 0:
        return model_path, "sdpa-attention: none found"
    save_onnx(model, out, external=bool(external_data_files(model_path)))
    if len(feeds) == 0:
        return model_path, f"sdpa-attention: {count} found, not used (no calibration samples to check them on)"
    error = _max_relative_error(model_path, out, feeds)
    if error > CHECK_TOLERANCE:
        return model_path, f"sdpa-attention: {count} found, not used (outputs differ by {error:.2g} of their range)"
    return out, f"sdpa-attention: {count} rewritten into Attention (outputs within {error:.1g} of the original's)"


class FusedDynamicQuantizationPass:
    """Transformer fusion, then dynamic int8: by default per-channel QInt8 weights, 7-bit (reduce_range) where
    this host's u8s8 kernels saturate (x86-64 without VNNI, see `int8_profile`)."""

    name = "dynamic-fused"

    def __init__(self, grid: tuple[tuple[str, bool, bool], ...] | None = None) -> None:
        self.grid = grid

    def skip_reason(self, context: PassContext) -> str | None:
        return int8_skip_reason(context)

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        import onnx

        source, how = preprocess(model_path, workdir)
        try:
            source, sdpa = rewrite_sdpa_attention(source, workdir / SDPA_NAME, context.calibration)
        except OptimizationError as exc:  # the rewrite does not run: fuse what onnxruntime knows, without it
            sdpa = f"sdpa-attention: not used ({exc})"
        fused = workdir / FUSED_NAME
        note = fuse_transformer(source, fused)
        grid = self.grid or (("QInt8", True, needs_reduce_range(context.host.arch, context.host.cpu_features)),)
        return quantize_grid(
            fused,
            workdir,
            grid,
            context.host,
            steps=(how, "transformer-fusion:bert"),
            kind="fused",
            notes=(note, sdpa),
            # the fused contrib operators have no ONNX shape inference: unknown tensor types are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
