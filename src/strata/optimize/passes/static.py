"""Static int8 quantization in QDQ format, calibrated on the calibration samples (MinMax, Entropy, Percentile).

Activations (uint8) get fixed scales from the calibration run, weights int8 scales. reduce_range follows
onnxruntime's advice for the host's ISA: on x86-64 without VNNI the u8s8 kernels can saturate, so weights use
7 bits there; elsewhere the full 8.

Transformers (attention and layer normalisation, see `looks_like_transformer`) get the recipe onnxruntime's
docs give for them, with what MiniLM showed on top:
- only MatMul and Gemm are quantized. By default onnxruntime's QDQ quantizer also quantizes Where, Gather,
  LayerNormalization, Reshape and Transpose; an exported attention mask is `Where(mask, 0, -inf)` (or the
  float minimum) added to the scores, so its calibrated range is infinite: MinMax makes scales that turn every
  score into noise (MiniLM: mean cosine 0.32) and the histogram calibrators refuse the range outright.
- the MatMuls fed by a GELU (a feed-forward block's down projection) stay in float: their input has a few
  units far larger than the rest (MiniLM: max |x| 20-90 times its standard deviation), which one per-tensor
  activation scale cannot hold (mean cosine 0.94 with them quantized, 0.992 without).
- the MatMuls' outputs stay float (`OpTypesToExcludeOutputQuantization`): onnxruntime then runs each as one
  int8 product that writes float, and the bias adds, residual sums and the softmax see no second rounding
  (MiniLM: mean cosine 0.991 -> 0.993, and no slower).
- weights get one scale per output channel.
- MinMax sees every calibration sample at its own length, so the padding's activations do not widen the
  ranges; the histogram calibrators stack the activations of all samples into one array and need one width.
Other graphs keep the quantizer's defaults and per-tensor weight scales (onnxruntime 1.32's QDQ quantizer fails
on per-channel Gemm weights whose bias is 2-D, which is what scikit-learn exports make).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from strata.optimize.base import Candidate, PassContext, external_data_files, save_onnx
from strata.optimize.passes.fp16 import named_nodes
from strata.optimize.passes.openvino import looks_like_transformer
from strata.optimize.passes.quantize import FeedsReader, int8_profile, needs_reduce_range, preprocess

METHODS = ("MinMax", "Entropy", "Percentile")
TRANSFORMER_OP_TYPES = ("MatMul", "Gemm")
_GELU = frozenset({"Erf", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Tanh"})
_ELEMENTWISE = frozenset({"Mul", "Add", "Div", "Sub"})
_GELU_DEPTH = 4  # Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5): the Erf is four producers up


def after_gelu(model: Any) -> list[str]:
    """The names of the MatMul/Gemm nodes whose activation input comes from a GELU (fused, or decomposed into
    Erf or Tanh and up to `_GELU_DEPTH` elementwise nodes). A nameless one is given a name first (the
    quantizer's `nodes_to_exclude` goes by name). Changes `model` (an onnx ModelProto).
    """
    producer = {output: node for node in model.graph.node for output in node.output}

    def from_gelu(tensor: str, depth: int) -> bool:
        node = producer.get(tensor)
        if node is None or depth == 0:
            return False
        if node.op_type in _GELU:
            return True
        return node.op_type in _ELEMENTWISE and any(from_gelu(i, depth - 1) for i in node.input)

    return named_nodes(
        model,
        lambda node: (
            node.op_type in TRANSFORMER_OP_TYPES and bool(node.input) and from_gelu(node.input[0], _GELU_DEPTH)
        ),
        "strata_after_gelu",
    )


def _op_types(model: Any) -> Iterable[str]:
    return (node.op_type for node in model.graph.node)


class StaticQuantizationPass:
    """One QDQ int8 candidate per calibration method."""

    name = "static"

    def __init__(self, methods: tuple[str, ...] = METHODS, max_samples: int = 64, per_channel: bool = False) -> None:
        """`per_channel`: per-channel weight scales for graphs that are not transformers (these always get them)."""
        self.methods = methods
        self.max_samples = max_samples
        self.per_channel = per_channel

    def skip_reason(self, context: PassContext) -> str | None:
        if not any("int8" in t.precisions for t in context.targets):
            return "no target runs int8"
        if len(context.calibration) == 0:
            return "no calibration samples"
        return None

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        source, how = preprocess(model_path, workdir)
        external = bool(external_data_files(source))  # the variants get their own data files (`<variant>.onnx.data`)
        model = onnx.load(str(source))
        transformer = looks_like_transformer(_op_types(model))
        kept_float = after_gelu(model) if transformer else []
        if kept_float:
            source = workdir / "static-source.onnx"  # the preprocessed model with every excluded node named
            save_onnx(model, source, external=external)
        per_channel = self.per_channel or transformer
        reduce_range = needs_reduce_range(context.host.arch, context.host.cpu_features)
        samples = min(self.max_samples, len(context.calibration))
        recipe = (
            f",ops={'+'.join(TRANSFORMER_OP_TYPES)},float_outputs,float_after_gelu={len(kept_float)}"
            if transformer
            else ",ops=all"
        )
        candidates = []
        for method in self.methods:
            cid = f"int8-qdq-{method.lower()}"
            out = workdir / f"{cid}.onnx"
            own_length = transformer and method == "MinMax"
            error = None
            try:
                quantize_static(
                    str(source),
                    str(out),
                    FeedsReader(context.calibration, samples, own_length=own_length),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    calibrate_method=getattr(CalibrationMethod, method),
                    use_external_data_format=external,
                    op_types_to_quantize=list(TRANSFORMER_OP_TYPES) if transformer else None,
                    nodes_to_exclude=kept_float,
                    extra_options=(
                        {"OpTypesToExcludeOutputQuantization": list(TRANSFORMER_OP_TYPES)} if transformer else {}
                    ),
                )
            except Exception as exc:  # onnx / onnxruntime errors, MemoryError of the histogram calibrators
                error = f"quantize_static ({method}) failed: {exc}"
            candidates.append(
                Candidate(
                    id=cid,
                    model_path=out,
                    profile=int8_profile(context.host, signed_weights=True, reduce_range=reduce_range),
                    runtime="onnxruntime",
                    precision="int8",
                    passes=(
                        how,
                        f"quantize-static:QDQ,calibrate={method},samples={samples},per_channel={per_channel},"
                        f"reduce_range={reduce_range}{recipe}" + (",unpadded" if own_length else ""),
                    ),
                    error=error,
                )
            )
        return candidates
