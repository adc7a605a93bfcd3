"""fp16 conversion (onnxconverter-common) for targets with a GPU runtime.

Inputs and outputs stay fp32 (`keep_io_types`), so the variant keeps the model's signature and golden data.
Every `Cast` to float stays fp32 with a cast to fp16 after it: the converter leaves such a node's `to` at float
while typing its output fp16, and onnxruntime refuses the model (transformers exported from PyTorch cast their
int64 attention mask to float this way).
One candidate per GPU target profile, for its CUDA runtime; a host without that runtime cannot measure it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from strata.core.errors import ConfigError, OptimizationError
from strata.optimize.base import GPU_RUNTIMES, Candidate, PassContext, external_data_files, save_onnx


class Float16Pass:
    """fp32 to fp16 for every target that lists a GPU runtime and fp16."""

    name = "fp16"

    def skip_reason(self, context: PassContext) -> str | None:
        if not self._targets(context):
            return "no target with a GPU runtime and fp16"
        return None

    @staticmethod
    def _targets(context: PassContext) -> list[str]:
        return [t.id for t in context.targets_with_runtime(GPU_RUNTIMES) if "fp16" in t.precisions]

    def apply(self, model_path: Path, workdir: Path, context: PassContext) -> list[Candidate]:
        try:
            import onnx
            from onnxconverter_common import float16
        except ImportError as exc:
            raise ConfigError("fp16 conversion needs onnxconverter-common: pip install 'strata[optimize]'") from exc
        out = workdir / "fp16.onnx"
        error = None
        notes: tuple[str, ...] = ()
        external = bool(external_data_files(model_path))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if external:
                    # The converter's shape inference serializes the model, which protobuf cannot past 2 GB: infer
                    # from the file instead, into this pass's folder, then read the weights from the model's.
                    shaped = workdir / "fp16-shapes.onnx"
                    try:
                        onnx.shape_inference.infer_shapes_path(str(model_path), str(shaped))
                        source = onnx.load(str(shaped), load_external_data=False)
                    finally:
                        shaped.unlink(missing_ok=True)
                    onnx.external_data_helper.load_external_data_for_model(source, str(model_path.parent))
                else:
                    source = onnx.load(str(model_path))
                model = float16.convert_float_to_float16(
                    source, keep_io_types=True, node_block_list=casts_to_float(source), disable_shape_infer=external
                )
            save_onnx(model, out, external=external)
            clamped = sum("will be truncated" in str(w.message) for w in caught)
            if clamped:
                notes = (f"{clamped} constant(s) outside the fp16 range were clamped by the converter",)
        except Exception as exc:  # onnx and onnxconverter-common raise assorted types
            error = f"fp16 conversion failed: {exc}"
        if error is None and not out.is_file():
            raise OptimizationError("fp16 conversion wrote no model")
        return [
            Candidate(
                id=f"fp16-{target}",
                model_path=out,
                profile=target,
                runtime="onnxruntime-cuda",
                precision="fp16",
                passes=("onnxconverter-common:float16,keep_io_types=True,casts_to_float_kept",),
                notes=notes,
                error=error,
            )
            for target in self._targets(context)
        ]


_FLOAT = 1  # onnx.TensorProto.FLOAT


def casts_to_float(model: Any) -> list[str]:
    """The names of the graph's `Cast(to=float)` nodes, for the converter's `node_block_list`; a nameless one
    is given a name of its own first (the block list goes by name). Changes `model` (an onnx ModelProto).
    """
    return named_nodes(
        model,
        lambda node: node.op_type == "Cast" and any(a.name == "to" and a.i == _FLOAT for a in node.attribute),
        "strata_cast_to_float",
    )


def named_nodes(model: Any, wanted: Callable[[Any], bool], prefix: str) -> list[str]:
    """The names of the nodes of `model` (an onnx ModelProto) for which `wanted(node)` holds, in graph order;
    a nameless one is named `prefix_INDEX` first (onnx tools' block and exclude lists go by name)."""
    taken = {node.name for node in model.graph.node}
    names = []
    for index, node in enumerate(model.graph.node):
        if not wanted(node):
            continue
        if not node.name:
            name = f"{prefix}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
        names.append(node.name)
    return names
