"""Running a candidate on this host: onnxruntime sessions and OpenVINO compiled models behind one interface.

OpenVINO and NNCF are imported only through `import_openvino`/`import_nncf`, which keep their usage telemetry
from loading: both libraries fall back to a no-op when the `openvino_telemetry` package cannot be imported,
and a strata process must not phone home from an edge site or a build machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from strata.core.datatypes import oip_from_ort
from strata.core.errors import ConfigError, OptimizationError
from strata.core.openvino_import import check_inference_precision, compile_config, import_openvino
from strata.core.package import TensorSpec, ort_disabled_optimizers
from strata.core.profiles import available_runtimes

Array = npt.NDArray[Any]

_ORT_PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def host_runtimes() -> frozenset[str]:
    """The runtimes this host can measure a variant with: onnxruntime, its GPU providers where a session on them
    was really made (`strata.core.profiles.available_runtimes`), OpenVINO if installed."""
    return frozenset({"onnxruntime"}) | available_runtimes()


class Runner(Protocol):
    """A loaded model: feeds in, named outputs out."""

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]: ...


class OrtRunner:
    """An onnxruntime session."""

    def __init__(self, path: Path, runtime: str = "onnxruntime", threads: int | None = None) -> None:
        """Raises:
        OptimizationError: onnxruntime cannot load the model with this runtime's providers, or made the session
            on another provider than the runtime's first (onnxruntime-gpu falls back to the CPU without a word
            where CUDA cannot load): timing it would measure another variant than the one named.
        """
        import warnings

        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        wanted = _ORT_PROVIDERS[runtime]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "provider not in available provider names": checked below
                self._session = ort.InferenceSession(
                    str(path), options, providers=wanted, disabled_optimizers=ort_disabled_optimizers(wanted)
                )
        except Exception as exc:  # onnxruntime raises C++ exception types; wrap them all.
            raise OptimizationError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        got = self._session.get_providers()
        if not got or got[0] != wanted[0]:
            raise OptimizationError(
                f"{runtime} needs {wanted[0]}, but onnxruntime made the session on {', '.join(got) or 'nothing'}"
                " (the provider is not installed or cannot load here); not measured on another provider"
            )
        self._names = [o.name for o in self._session.get_outputs()]

    def signature(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """The model's inputs and outputs (Open Inference Protocol datatypes, -1 for dynamic dimensions).

        Raises:
            PackageError: an input or output is not a tensor strata can serve.
        """

        def specs(args: Any) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(
                    name=arg.name,
                    datatype=oip_from_ort(arg.type),
                    shape=tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or [])),
                )
                for arg in args
            )

        return specs(self._session.get_inputs()), specs(self._session.get_outputs())

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Raises:
        OptimizationError: the run fails.
        """
        try:
            values = self._session.run(self._names, dict(feeds))
        except Exception as exc:  # onnxruntime's C++ errors
            raise OptimizationError(f"onnxruntime run failed: {exc}") from exc
        return dict(zip(self._names, values, strict=True))


class OpenVinoRunner:
    """An OpenVINO model compiled for the CPU device, in the inference precision of the variant's precision
    (f32 for fp32 and int8: OpenVINO would pick bf16 by itself on a CPU with bf16, and measure another variant
    than the one that is labelled)."""

    def __init__(self, path: Path, threads: int | None = None, precision: str = "fp32") -> None:
        """Raises:
        ConfigError: OpenVINO is not installed, or strata has no OpenVINO variant of this precision.
        OptimizationError: OpenVINO cannot read or compile the model, or not in that precision.
        """
        config = compile_config(precision, threads)
        ov = import_openvino()
        try:
            self._compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types from C++.
            raise OptimizationError(f"OpenVINO cannot compile {path.name}: {exc}") from exc
        try:
            check_inference_precision(self._compiled, precision)
        except ConfigError as exc:
            raise OptimizationError(str(exc)) from exc
        self._request = self._compiled.create_infer_request()
        self._outputs = [(port, port.get_any_name()) for port in self._compiled.outputs]

    @property
    def compiled_model(self) -> Any:
        """OpenVINO's CompiledModel (its `get_property` says what the CPU plugin really runs)."""
        return self._compiled

    def run(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Raises:
        OptimizationError: the inference fails.
        """
        try:
            results = self._request.infer(dict(feeds))
            return {name: results[port].copy() for port, name in self._outputs}
        except Exception as exc:  # OpenVINO's C++ errors
            raise OptimizationError(f"OpenVINO inference failed: {exc}") from exc


def open_runner(path: Path, runtime: str, threads: int | None = None, precision: str = "fp32") -> Runner:
    """Load a variant's model with its runtime, to compute in its precision (`precision`: fp32, fp16, int8).

    onnxruntime's CPU provider computes in the model's own types (it never turns float32 into bf16 by itself
    on x86), so only OpenVINO is told the precision.

    Raises:
        ConfigError: the runtime is unknown or not installed.
        OptimizationError: the runtime cannot load the model.
    """
    if runtime == "openvino":
        return OpenVinoRunner(path, threads, precision)
    if runtime in _ORT_PROVIDERS:
        return OrtRunner(path, runtime, threads)
    raise ConfigError(f"no runner for runtime {runtime!r}")
