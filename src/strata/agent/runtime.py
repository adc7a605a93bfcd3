"""Runtimes that execute a package's model on this node, and the golden health check.

onnxruntime is imported here, inside the functions that need it, so nothing else pays for it at import.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from strata.agent.config import GOLDEN_TIMEOUT_S
from strata.core.datatypes import ORT_TO_OIP
from strata.core.errors import BadRequest, ConfigError, InferenceError, ModelLoadError
from strata.core.openvino_import import check_inference_precision, compile_config, import_openvino
from strata.core.package import (
    Package,
    TensorSpec,
    check_model_references,
    compare_outputs,
    load_golden,
    ort_session_in_memory,
)

Array = npt.NDArray[Any]

_DYNAMIC_QUANTIZATION_OP = b"DynamicQuantize"  # DynamicQuantizeLinear, DynamicQuantizeMatMul, ...

_PROVIDERS = {
    "onnxruntime": ["CPUExecutionProvider"],
    "onnxruntime-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "onnxruntime-tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class Runtime(Protocol):
    """A loaded model that turns feeds into outputs. `run` is safe to call from several threads.

    A runtime may also say `rows_independent = False` when the rows of one call affect each other's results,
    so the inference server does not batch requests together (see `strata.agent.batch_plan`).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]: ...


class OnnxRuntimeModel:
    """A model held in an onnxruntime InferenceSession (loaded from bytes, so files can stay encrypted).

    External data comes only from `external` (file name -> bytes, in memory): onnxruntime refuses a location
    missing from that table instead of reading the disk, and without a table it is pointed at an empty folder
    of its own rather than at the process's working directory. `load_runtime` checks the references first.

    The session is freed when the last reference goes: requests in flight keep the one they started on.
    `rows_independent` is False for a model quantized dynamically (onnxruntime's DynamicQuantizeLinear and its
    fused forms): it quantizes activations with one scale per tensor, measured over the whole batch, so the
    answer to one row depends on the rows beside it.
    """

    def __init__(
        self,
        model: bytes,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        runtime: str = "onnxruntime",
        threads: int | None = None,
        external: Mapping[str, bytes] | None = None,
    ) -> None:
        """Raises:
        ModelLoadError: onnxruntime refuses the model or the runtime is not installed here.
        """
        providers = _PROVIDERS.get(runtime)
        if providers is None:
            raise ModelLoadError(f"runtime {runtime!r} is not available in this agent")
        import onnxruntime as ort

        missing = [p for p in providers[:1] if p not in ort.get_available_providers()]
        if missing:
            raise ModelLoadError(f"runtime {runtime} needs {missing[0]}, which this onnxruntime build lacks")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # onnxruntime's CPU arena keeps the peak of every run for the life of the session: one large batch
        # would hold tens of MB forever and break the agent's memory budget. Plain malloc costs ~10 µs a run.
        options.enable_cpu_mem_arena = False
        # onnxruntime's pool threads spin while they wait for work. On a node whose cores are shared (the
        # event loop, other processes) the spinning threads steal the CPU the work needs: MiniLM int8 runs at
        # about twice the rate without it on a busy 2-core machine, and a small model's idle pool burns a core.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = ort_session_in_memory(ort, model, options, external, providers)
        except Exception as exc:  # onnxruntime raises C++ exception types; wrap them all.
            raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc
        made_on = self._session.get_providers()
        if not made_on or made_on[0] != providers[0]:
            # onnxruntime-gpu falls back to the CPU without a word where CUDA cannot load: a CUDA variant
            # served on the CPU would be a different (fp16-on-CPU, slow) model than the one chosen
            made = ", ".join(made_on) or "nothing"
            raise ModelLoadError(f"runtime {runtime} needs {providers[0]}, but onnxruntime made the session on {made}")
        mismatches = [
            *signature_mismatches(inputs, _ort_signature(self._session.get_inputs()), "input"),
            *signature_mismatches(outputs, _ort_signature(self._session.get_outputs()), "output"),
        ]
        if mismatches:
            # served anyway, every request would fail (or be refused as the caller's) on what the manifest promised
            raise ModelLoadError(f"the model does not match its manifest: {'; '.join(mismatches[:8])}")
        self.inputs = inputs
        self.outputs = outputs
        self._output_names = [o.name for o in outputs]
        # op types are plain strings in the ONNX protobuf: a byte search finds them without parsing the graph
        self.rows_independent = _DYNAMIC_QUANTIZATION_OP not in model

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        """Run the model.

        Raises:
            BadRequest: onnxruntime rejects the feeds as invalid arguments (a value out of an embedding's range).
            InferenceError: the model itself failed while running (the model's fault, not the caller's: it counts
                against the version in the node's error rate and probation).
        """
        names = list(output_names) if output_names else self._output_names  # none named: every output
        return self._run(feeds, names, None)

    def run_within(self, feeds: Mapping[str, Array], output_names: Sequence[str], timeout_s: float) -> dict[str, Array]:
        """`run`, stopped once `timeout_s` has passed (onnxruntime checks its terminate flag between nodes and
        between a loop's iterations: a kernel under way finishes first).

        Raises:
            BadRequest, InferenceError: as `run`; InferenceError too when the run did not finish in time.
        """
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # the terminated run is reported here, not also as an error in the log
        timer = threading.Timer(timeout_s, setattr, (options, "terminate", True))
        timer.daemon = True
        timer.start()
        try:
            return self._run(feeds, list(output_names) or self._output_names, options, timeout_s)
        finally:
            timer.cancel()

    def _run(
        self, feeds: Mapping[str, Array], names: list[str], options: Any, timeout_s: float | None = None
    ) -> dict[str, Array]:
        """One session run (`options`: onnxruntime's RunOptions or None), its errors told apart."""
        try:
            results = self._session.run(names, dict(feeds), options)
        except Exception as exc:  # onnxruntime's pybind exception types; only INVALID_ARGUMENT is the caller's
            if options is not None and options.terminate:
                raise InferenceError(f"the model did not finish in {timeout_s:g} s") from None
            if type(exc).__name__ == "InvalidArgument":
                raise BadRequest(f"the model rejected the input: {exc}") from exc
            raise InferenceError(f"the model failed while running: {exc}") from exc
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}


def _ort_signature(args: Sequence[Any]) -> list[tuple[str, str, tuple[int | str | None, ...]]]:
    """(name, onnxruntime type string, shape) of a session's inputs or outputs."""
    return [(arg.name, arg.type, tuple(arg.shape or ())) for arg in args]


def signature_mismatches(
    declared: Sequence[TensorSpec], model: Sequence[tuple[str, str, tuple[int | str | None, ...]]], kind: str
) -> list[str]:
    """How the tensors a manifest declares (`kind`: "input" or "output") differ from the model's own (name,
    onnxruntime type, shape; a dimension is an int, or a name or None when dynamic). Empty when they agree.

    The manifest is what clients are told and what every request is checked against: each declared tensor must
    be the model's, of the same datatype and rank, each fixed dimension of the model fixed to the same size in the
    manifest (a manifest may fix what the model leaves dynamic, not the other way round); a model whose shape is
    unknown (onnxruntime says [] for it, as for a scalar) is checked on its datatype only. Every input the model
    needs must be declared, or no request could feed it. A model output the manifest leaves out is not served.
    """
    found = {name: (type_string, shape) for name, type_string, shape in model}
    problems = []
    for spec in declared:
        if spec.name not in found:
            problems.append(f"{kind} {spec.name[:64]!r} is not one of the model's")
            continue
        type_string, shape = found[spec.name]
        datatype = ORT_TO_OIP.get(type_string, type_string)
        if datatype != spec.datatype:
            problems.append(f"{kind} {spec.name[:64]!r} is {datatype} in the model, {spec.datatype} in the manifest")
        elif shape and (
            len(shape) != len(spec.shape)
            or any(isinstance(got, int) and want != got for want, got in zip(spec.shape, shape, strict=True))
        ):
            model_shape = [d if isinstance(d, int) else -1 for d in shape]
            problems.append(
                f"{kind} {spec.name[:64]!r} has shape {model_shape} in the model, {list(spec.shape)} in the manifest"
            )
    if kind == "input":
        names = {spec.name for spec in declared}
        problems += [f"model input {name[:64]!r} is not in the manifest" for name, _, _ in model if name not in names]
    return problems


_M_ARENA_MAX = -8  # glibc's mallopt parameter number for the arena limit


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """A function of the C library by name, None where this C library lacks it (glibc has both we use)."""
    import ctypes

    function: Callable[..., int] | None = getattr(ctypes.CDLL(None), name, None)
    return function


def limit_malloc_arenas() -> bool:
    """Make every thread allocate from glibc's main arena; True when applied, False (no-op) off glibc.

    glibc gives threads arenas of their own, and `malloc_trim` cannot give back the free top of those, so
    what a large batch used on an executor thread would stay resident. With one arena `release_free_memory`
    returns all of it. Call once at agent startup, before worker threads allocate; those threads hold the
    GIL most of the time, so sharing one arena costs no throughput.
    """
    mallopt = _libc_function("mallopt")
    return mallopt is not None and mallopt(_M_ARENA_MAX, 1) == 1


def release_free_memory() -> bool:
    """Give freed heap memory back to the OS; True when the C library can (glibc), else a no-op.

    glibc keeps freed memory for reuse, so after a large request or an unloaded model the process stays as
    large as its peak. Call this when that work is done and the process is quiet; it takes milliseconds.
    """
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True


class OpenVinoModel:
    """A model held by OpenVINO, compiled for the CPU from the IR's bytes (so files can stay encrypted).

    OpenVINO is imported only when a node loads such a package (its telemetry kept off); each run takes its
    own infer request, so several threads can run at once. It computes in the inference precision of the
    package's precision (f32 for fp32 and for the float parts of int8), never in the bf16 OpenVINO's CPU plugin
    would pick by itself on a CPU with bf16.
    """

    def __init__(
        self,
        xml: bytes,
        weights: bytes,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        threads: int | None = None,
        precision: str = "fp32",
    ) -> None:
        """Raises:
        ModelLoadError: OpenVINO is missing, cannot read or compile the model, or cannot run it in the
            precision the package says.
        """
        try:
            config = compile_config(precision, threads)
            ov = import_openvino()
            core = ov.Core()
            model = core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
            self._compiled = core.compile_model(model, "CPU", config)
            check_inference_precision(self._compiled, precision)
        except ConfigError as exc:
            raise ModelLoadError(str(exc)) from exc
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types from C++
            raise ModelLoadError(f"OpenVINO cannot load the model: {exc}") from exc
        self.inputs = inputs
        self.outputs = outputs
        self._ports = {port.get_any_name(): port for port in self._compiled.outputs}

    @property
    def compiled_model(self) -> Any:
        """OpenVINO's CompiledModel (its `get_property` says what the CPU plugin really runs)."""
        return self._compiled

    def run(self, feeds: Mapping[str, Array], output_names: Sequence[str] | None = None) -> dict[str, Array]:
        """Run the model.

        Raises:
            BadRequest: OpenVINO rejects the feeds.
        """
        names = list(output_names) if output_names is not None else [o.name for o in self.outputs]
        try:
            results = self._compiled.create_infer_request().infer(dict(feeds))
            return {name: np.asarray(results[self._ports[name]]).copy() for name in names}
        except Exception as exc:  # OpenVINO's C++ errors for values the signature check let through
            raise BadRequest(f"the model rejected the input: {exc}") from exc

    def run_within(self, feeds: Mapping[str, Array], output_names: Sequence[str], timeout_s: float) -> dict[str, Array]:
        """`run`, cancelled once `timeout_s` has passed.

        Raises:
            BadRequest: OpenVINO rejects the feeds.
            InferenceError: the run did not finish in time.
        """
        request = self._compiled.create_infer_request()
        try:
            request.start_async(dict(feeds))
            finished = request.wait_for(max(1, int(timeout_s * 1000)))
        except Exception as exc:  # OpenVINO's C++ errors for values the signature check let through
            raise BadRequest(f"the model rejected the input: {exc}") from exc
        if not finished:
            request.cancel()
            raise InferenceError(f"the model did not finish in {timeout_s:g} s")
        return {name: np.asarray(request.get_tensor(self._ports[name]).data).copy() for name in output_names}


def load_runtime(
    package: Package,
    threads: int | None = None,
    model_bytes: bytes | None = None,
    files: Mapping[str, bytes] | None = None,
) -> OnnxRuntimeModel | OpenVinoModel:
    """Load a verified package's model with the runtime its manifest names.

    `model_bytes` (or `files`, every file by path) lets a caller pass the model already in memory (decrypted
    from an encrypted package, say); by default it is read.

    Raises:
        PackageError: the model references a file outside its package (ONNX external data), or an OpenVINO
            package's model is not IR XML: it is refused before a runtime reads it.
        ModelLoadError: the runtime is missing or refuses the model.
    """
    manifest = package.manifest
    if model_bytes is None and files is not None:
        model_bytes = files.get(manifest.model_file)
    if model_bytes is None:
        try:
            model_bytes = package.model_path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"cannot read {package.model_path}: {exc}") from exc
    # Before any runtime sees the bytes: the model may reference nothing but files of its own package.
    refs = check_model_references(manifest, model_bytes)
    if manifest.runtime.startswith("onnxruntime"):
        external = {ref.location: _package_file(package, ref.location, files) for ref in refs}
        return OnnxRuntimeModel(model_bytes, manifest.inputs, manifest.outputs, manifest.runtime, threads, external)
    if manifest.runtime == "openvino":
        weights = next((f for f in manifest.files if f.path.endswith(".bin")), None)
        if weights is None:
            raise ModelLoadError("an OpenVINO package needs the IR's .bin weights file")
        weight_bytes = _package_file(package, weights.path, files)
        return OpenVinoModel(model_bytes, weight_bytes, manifest.inputs, manifest.outputs, threads, manifest.precision)
    raise ModelLoadError(f"runtime {manifest.runtime!r} is not supported by this agent")


def _package_file(package: Package, path: str, files: Mapping[str, bytes] | None) -> bytes:
    """A (listed, verified) file of the package: from `files` when given, else read from the package folder.

    Raises:
        ModelLoadError: it cannot be read.
    """
    if files is not None and path in files:
        return files[path]
    try:
        return (package.path / path).read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def health_check(
    package: Package,
    runtime: OnnxRuntimeModel | OpenVinoModel,
    files: Mapping[str, bytes] | None = None,
    timeout_s: float = GOLDEN_TIMEOUT_S,
) -> list[str]:
    """Replay the package's golden inputs, within `timeout_s`; return what differs from the expected outputs
    (empty = healthy)."""
    try:
        inputs, expected = load_golden(package, (files or {}).get(package.manifest.golden.file))
        actual = runtime.run_within(inputs, list(expected), timeout_s)
    except Exception as exc:  # any failure here means the model is not healthy; say what it was
        return [f"golden run failed: {exc}"]
    return compare_outputs(expected, actual, package.manifest.golden.rtol, package.manifest.golden.atol)


def load_and_check(
    package: Package,
    threads: int | None = None,
    model_bytes: bytes | None = None,
    files: Mapping[str, bytes] | None = None,
    check_timeout_s: float = GOLDEN_TIMEOUT_S,
) -> Runtime:
    """Load a package's model and pass its golden health check (within `check_timeout_s`), or raise.

    Raises:
        PackageError: as `load_runtime`.
        ModelLoadError: the model does not load, or its golden outputs differ or do not come in time (the message
            says how).
    """
    runtime = load_runtime(package, threads, model_bytes, files)
    problems = health_check(package, runtime, files, check_timeout_s)
    if problems:
        raise ModelLoadError("health check failed: " + "; ".join(problems))
    return runtime
