"""Static int8 quantization in QDQ format, calibrated on the calibration samples (MinMax, Entropy, Percentile).

Activations (uint8) get fixed scales from the calibration run, weights int8 scales. reduce_range follows
onnxruntime's advice for the host's ISA: on x86-64 without VNNI the u8s8 kernels can saturate, so weights use
7 bits there; elsewhere the full 8. Weight scales are per tensor by default: onnxruntime 1.32's QDQ quantizer
fails on per-channel Gemm weights whose bias is 2-D (its int32 bias-scale check compares whole arrays), which
is what scikit-learn exports make.
"""

from __future__ import annotations

from pathlib import Path

from strata.optimize.base import Candidate, PassContext
from strata.optimize.passes.quantize import FeedsReader, preprocess

METHODS = ("MinMax", "Entropy", "Percentile")


def needs_reduce_range(arch: str, cpu_features: frozenset[str]) -> bool:
    """True on x86-64 CPUs without VNNI (u8s8 saturation), the case onnxruntime recommends reduce_range for."""
    return arch == "x86_64" and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features)


class StaticQuantizationPass:
    """One QDQ int8 candidate per calibration method."""

    name = "static"

    def __init__(self, methods: tuple[str, ...] = METHODS, max_samples: int = 64, per_channel: bool = False) -> None:
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
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        source, how = preprocess(model_path, workdir)
        reduce_range = needs_reduce_range(context.host.arch, context.host.cpu_features)
        samples = min(self.max_samples, len(context.calibration))
        candidates = []
        for method in self.methods:
            cid = f"int8-qdq-{method.lower()}"
            out = workdir / f"{cid}.onnx"
            error = None
            try:
                quantize_static(
                    str(source),
                    str(out),
                    FeedsReader(context.calibration, samples),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=self.per_channel,
                    reduce_range=reduce_range,
                    calibrate_method=getattr(CalibrationMethod, method),
                )
            except Exception as exc:  # onnx / onnxruntime errors, MemoryError of the histogram calibrators
                error = f"quantize_static ({method}) failed: {exc}"
            candidates.append(
                Candidate(
                    id=cid,
                    model_path=out,
                    profile="cpu-generic",
                    runtime="onnxruntime",
                    precision="int8",
                    passes=(
                        how,
                        f"quantize-static:QDQ,calibrate={method},samples={samples},per_channel={self.per_channel},"
                        f"reduce_range={reduce_range}",
                    ),
                    error=error,
                )
            )
        return candidates
