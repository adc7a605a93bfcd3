"""onnxruntime graph optimization at each level, saved as a model (`SessionOptions.optimized_model_filepath`).

basic and extended rewrites are semantics-preserving fusions that any onnxruntime CPU build runs (extended adds
onnxruntime's own fused operators, so the model needs onnxruntime); layout and all add layout transformations
(NCHWc) chosen for this CPU's vector width. onnxruntime warns that such a model "should only be used in the same
environment the model was optimized in", so those variants are built for this host's ISA profile.
"""

from __future__ import annotations

from pathlib import Path

from strata.core.errors import OptimizationError
from strata.core.package import ort_disabled_optimizers
from strata.optimize.base import EXTERNAL_DATA_THRESHOLD, Candidate, PassContext, external_data_files

LEVELS = ("basic", "extended", "layout", "all")
ISA_BOUND_LEVELS = frozenset({"layout", "all"})


class GraphOptimizationPass:
    """One fp32 candidate per onnxruntime graph optimization level."""

    name = "graph"

    def __init__(self, levels: tuple[str, ...] = LEVELS) -> None:
        unknown = set(levels) - set(LEVELS)
        if unknown:
            raise OptimizationError(f"unknown optimization level(s) {sorted(unknown)}; known: {list(LEVELS)}")
        self.levels = levels

    def skip_reason(self, context: PassContext) -> str | None:
        return None

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        import onnxruntime as ort

        level_enum = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "layout": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        external = bool(external_data_files(model_path))
        candidates = []
        for level in self.levels:
            out = workdir / f"fp32-ort-{level}.onnx"
            isa_bound = level in ISA_BOUND_LEVELS
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.graph_optimization_level = level_enum[level]
            options.optimized_model_filepath = str(out)
            if external:  # its own data file: the source's is not beside it (and would not match its initializers)
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", f"{out.name}.data"
                )
                options.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_DATA_THRESHOLD)
                )
            error = None
            try:
                providers = ["CPUExecutionProvider"]
                ort.InferenceSession(
                    str(model_path),
                    options,
                    providers=providers,
                    disabled_optimizers=ort_disabled_optimizers(providers),
                )
            except Exception as exc:  # onnxruntime's C++ errors
                error = f"onnxruntime {level} optimization failed: {exc}"
            candidates.append(
                Candidate(
                    id=f"fp32-ort-{level}",
                    model_path=out,
                    profile=context.host.id if isa_bound else "cpu-generic",
                    runtime="onnxruntime",
                    precision="fp32",
                    passes=(f"ort-graph-optimization:{level}",),
                    notes=(f"layout optimized for {context.host.id}: tied to that ISA",) if isa_bound else (),
                    error=error,
                )
            )
        return candidates
