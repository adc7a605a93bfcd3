"""Dynamic int8 quantization (weights int8 offline, activations per run), searched over its three knobs.

weight type (QInt8 / QUInt8), per-channel weight scales, and reduce_range (7-bit weights). onnxruntime's docs
say why the search matters: on x86-64 CPUs without VNNI the u8s8 kernels (VPMADDUBSW) can saturate, and
reduce_range or per-channel scales win accuracy back; only measuring tells which combination a model needs.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

from strata.core.errors import OptimizationError
from strata.optimize.base import Candidate, PassContext
from strata.optimize.passes.quantize import preprocess


def dynamic_id(weight_type: str, per_channel: bool, reduce_range: bool) -> str:
    """`int8-dyn-s8`, `int8-dyn-u8-pc-rr`, ...: the candidate id of one point of the search."""
    kind = "s8" if weight_type == "QInt8" else "u8"
    return "int8-dyn-" + kind + ("-pc" if per_channel else "") + ("-rr" if reduce_range else "")


class DynamicQuantizationPass:
    """One int8 candidate per (weight type, per_channel, reduce_range)."""

    name = "dynamic"

    def __init__(
        self,
        weight_types: tuple[str, ...] = ("QInt8", "QUInt8"),
        per_channel: tuple[bool, ...] = (False, True),
        reduce_range: tuple[bool, ...] = (False, True),
    ) -> None:
        if not set(weight_types) <= {"QInt8", "QUInt8"}:
            raise OptimizationError(f"dynamic quantization weight types are QInt8 and QUInt8, not {weight_types}")
        self.grid = list(product(weight_types, per_channel, reduce_range))

    def skip_reason(self, context: PassContext) -> str | None:
        if not any("int8" in t.precisions for t in context.targets):
            return "no target runs int8"
        return None

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        source, how = preprocess(model_path, workdir)
        candidates = []
        for weight_type, per_channel, reduce_range in self.grid:
            cid = dynamic_id(weight_type, per_channel, reduce_range)
            out = workdir / f"{cid}.onnx"
            error = None
            try:
                quantize_dynamic(
                    str(source),
                    str(out),
                    weight_type=getattr(QuantType, weight_type),
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                )
            except Exception as exc:  # onnx / onnxruntime errors
                error = f"quantize_dynamic failed: {exc}"
            candidates.append(
                Candidate(
                    id=cid,
                    model_path=out,
                    profile="cpu-generic",
                    runtime="onnxruntime",
                    precision="int8",
                    passes=(
                        how,
                        f"quantize-dynamic:weight_type={weight_type},per_channel={per_channel},"
                        f"reduce_range={reduce_range}",
                    ),
                    error=error,
                )
            )
        return candidates
