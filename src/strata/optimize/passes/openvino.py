"""OpenVINO conversion (`openvino.convert_model`) and NNCF post-training int8 quantization, for targets whose
runtimes include OpenVINO.

Two candidates: the converted fp32 IR, and the IR quantized with `nncf.quantize` on the calibration samples;
a third where a target offers bf16 (AVX512_BF16 or AMX): the fp32 IR compiled to compute in bf16, the natural
bf16 variant (onnxruntime's CPU provider has almost no bf16 kernels, so strata builds no bf16 ONNX graph).
Transformer graphs (attention: MatMul and Softmax, with layer normalisation) get NNCF's transformer model type,
which keeps the accuracy-sensitive operations in float as NNCF's docs advise.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from strata.core.errors import OptimizationError
from strata.core.openvino_import import import_nncf, import_openvino
from strata.optimize.base import Candidate, PassContext


def looks_like_transformer(op_types: Iterable[str]) -> bool:
    """True for graphs with attention (MatMul and Softmax) and layer normalisation (fused or decomposed)."""
    ops = set(op_types)
    return {"MatMul", "Softmax"} <= ops and bool({"LayerNormalization", "ReduceMean"} & ops)


def _op_types(model_path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


class OpenVinoPass:
    """fp32 IR and NNCF int8 IR for the first target that lists the openvino runtime; the fp32 IR in bf16 for
    the first such target that lists bf16."""

    name = "openvino"

    def __init__(self, max_samples: int = 300) -> None:
        self.max_samples = max_samples

    def skip_reason(self, context: PassContext) -> str | None:
        if not context.targets_with_runtime(["openvino"]):
            return "no target lists the openvino runtime"
        for module in ("openvino", "nncf"):
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install 'strata[optimize]')"
        return None

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        ov = import_openvino()
        nncf = import_nncf()
        target = context.targets_with_runtime(["openvino"])[0]
        fp32_xml = workdir / "ov-fp32" / "model.xml"
        int8_xml = workdir / "ov-int8" / "model.xml"
        try:
            model = ov.convert_model(str(model_path))
            ov.save_model(model, str(fp32_xml), compress_to_fp16=False)
        except Exception as exc:  # OpenVINO's frontend raises its own types from C++
            raise OptimizationError(f"OpenVINO cannot convert {model_path.name}: {exc}") from exc
        transformer = looks_like_transformer(_op_types(model_path))
        samples = min(self.max_samples, len(context.calibration))
        options = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        error = None
        try:
            dataset = nncf.Dataset([context.calibration.batch(row, row + 1) for row in range(samples)])
            quantized = nncf.quantize(model, dataset, subset_size=samples, **options)
            ov.save_model(quantized, str(int8_xml))
        except Exception as exc:  # NNCF raises nncf.* errors and lets OpenVINO's through
            error = f"nncf.quantize failed: {exc}"
        preset = "model_type=TRANSFORMER" if transformer else "model_type=default"
        fp32 = Candidate(
            id="ov-fp32",
            model_path=fp32_xml,
            profile=target.id,
            runtime="openvino",
            precision="fp32",
            passes=("openvino.convert_model",),
        )
        int8 = replace(
            fp32,
            id="ov-int8",
            model_path=int8_xml,
            precision="int8",
            passes=("openvino.convert_model", f"nncf.quantize:{preset},subset_size={samples}"),
            error=error,
        )
        bf16_target = next((t for t in context.targets_with_runtime(["openvino"]) if "bf16" in t.precisions), None)
        if bf16_target is None:
            return [fp32, int8]
        bf16 = replace(
            fp32,
            id="ov-bf16",
            profile=bf16_target.id,
            precision="bf16",
            passes=("openvino.convert_model", "INFERENCE_PRECISION_HINT=bf16"),
        )
        return [fp32, int8, bf16]
