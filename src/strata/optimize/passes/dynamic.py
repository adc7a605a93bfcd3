"""Dynamic int8 quantization (weights int8 offline, activations per run), searched over its three knobs.

weight type (QInt8 / QUInt8), per-channel weight scales, and reduce_range (7-bit weights). onnxruntime's docs
say why the search matters: on x86-64 CPUs without VNNI the u8s8 kernels (VPMADDUBSW) can saturate, and
reduce_range or per-channel scales win accuracy back; only measuring tells which combination a model needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any

from strata.core.errors import OptimizationError
from strata.core.profiles import Profile
from strata.optimize.base import Candidate, PassContext, external_data_files
from strata.optimize.passes.quantize import int8_profile, preprocess


def dynamic_id(weight_type: str, per_channel: bool, reduce_range: bool, kind: str = "") -> str:
    """`int8-dyn-s8`, `int8-dyn-u8-pc-rr`, `int8-dyn-fused-s8-pc` (`kind="fused"`), ...: the candidate id of one
    point of the search."""
    weights = "s8" if weight_type == "QInt8" else "u8"
    prefix = f"int8-dyn-{kind}-" if kind else "int8-dyn-"
    return prefix + weights + ("-pc" if per_channel else "") + ("-rr" if reduce_range else "")


def int8_skip_reason(context: PassContext) -> str | None:
    """Why an int8 pass has nothing to do for `context`'s targets (None when one of them runs int8)."""
    if not any("int8" in t.precisions for t in context.targets):
        return "no target runs int8"
    return None


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
        return int8_skip_reason(context)

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        source, how = preprocess(model_path, workdir)
        return quantize_grid(source, workdir, self.grid, context.host, steps=(how,))


def quantize_grid(
    source: Path,
    workdir: Path,
    grid: Sequence[tuple[str, bool, bool]],
    host: Profile,
    *,
    steps: tuple[str, ...],
    kind: str = "",
    notes: tuple[str, ...] = (),
    extra_options: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """One dynamic int8 candidate of `source` per (weight type, per_channel, reduce_range) of `grid`, its id
    marked with `kind` (`int8-dyn-fused-s8-pc`), for the profile `int8_profile` gives on `host` (this host's ISA
    profile); a point that fails to quantize is a candidate with its error."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = bool(external_data_files(source))  # the variants get their own data files (`<variant>.onnx.data`)
    candidates = []
    for weight_type, per_channel, reduce_range in grid:
        cid = dynamic_id(weight_type, per_channel, reduce_range, kind)
        out = workdir / f"{cid}.onnx"
        error = None
        try:
            quantize_dynamic(
                str(source),
                str(out),
                weight_type=getattr(QuantType, weight_type),
                per_channel=per_channel,
                reduce_range=reduce_range,
                use_external_data_format=external,
                extra_options=dict(extra_options or {}),
            )
        except Exception as exc:  # onnx / onnxruntime errors
            error = f"quantize_dynamic failed: {exc}"
        candidates.append(
            Candidate(
                id=cid,
                model_path=out,
                profile=int8_profile(host, weight_type == "QInt8", reduce_range),
                runtime="onnxruntime",
                precision="int8",
                passes=(
                    *steps,
                    f"quantize-dynamic:weight_type={weight_type},per_channel={per_channel},reduce_range={reduce_range}",
                ),
                notes=notes,
                error=error,
            )
        )
    return candidates
