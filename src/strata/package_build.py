"""Building a model package from an ONNX model: signature from the graph, golden outputs from onnxruntime.

The format, reading and verification are `strata.core.package`; this is the half only the CLI, the optimizer and
tests use, kept out of `core` so that nothing on a node (the agent) loads it. onnxruntime is imported inside the
functions that run a model.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from strata import __version__
from strata.core.chunking import chunk_file
from strata.core.datatypes import OIP_TO_NUMPY, oip_from_ort
from strata.core.errors import ConfigError, PackageBuildError, PackageError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import canonical_json, sha256_file
from strata.core.modelrefs import check_location, onnx_external_refs
from strata.core.package import (
    DEFAULT_TOLERANCE,
    GOLDEN_NAME,
    MANIFEST_NAME,
    MODEL_NAME,
    Array,
    FileEntry,
    GoldenSpec,
    Manifest,
    Package,
    TensorSpec,
    check_name,
    ort_session_in_memory,
)

MAX_GOLDEN_SAMPLES: Final = 4
MAX_REFERENCE_SAMPLES: Final = 512
# Made-up golden inputs are for a smoke check, a few samples; a model whose declared dims ask for more than this
# many values over all inputs (64 MiB of float32) gets real samples instead. Declared dims are the model's claim:
# [100000, 100000, 1000] asked numpy for 72.8 TiB, and dims that fit in memory but are huge were really allocated
# and written into the golden file.
MAX_MADE_UP_VALUES: Final = 16 * 2**20


def _session(model_bytes: bytes, external: Mapping[str, bytes]) -> Any:
    """An onnxruntime session over the model's bytes, its external data given in memory (nothing else read)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort_session_in_memory(ort, model_bytes, options, external, ["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types from C++; wrap them all.
        raise PackageBuildError(f"not a loadable ONNX model: {exc}") from exc


def _external_data(model_bytes: bytes, extra_files: Sequence[Path], data_files: Mapping[str, Path]) -> dict[str, bytes]:
    """The bytes of the files the model's external data names, each read once: `data_files` by location, else the
    extra files by name (which must cover them all).

    Raises:
        PackageBuildError: the model references external data that is neither.
    """
    try:
        refs = onnx_external_refs(model_bytes)
    except PackageError as exc:
        raise PackageBuildError(f"not a loadable ONNX model: {exc}") from exc
    try:
        extras = {path.name: path for path in extra_files}
        data: dict[str, bytes] = {}
        for ref in refs:
            check_location(ref.location)
            if ref.location in data:  # a model's tensors share a few files: read each once, not once per tensor
                continue
            source = data_files.get(ref.location, extras.get(ref.location))
            if source is None:
                raise PackageError(
                    f"tensor {ref.tensor!r} keeps its data in {ref.location!r}: ship that file with --extra (its "
                    "name, at the package's top level, is what the model must reference)"
                )
            data[ref.location] = source.read_bytes()
    except (PackageError, OSError) as exc:
        raise PackageBuildError(f"model external data: {exc}") from exc
    return data


def _signature(args: Iterable[Any]) -> tuple[tuple[TensorSpec, ...], dict[str, list[int | str | None]]]:
    specs = []
    raw_shapes: dict[str, list[int | str | None]] = {}
    for arg in args:
        shape = list(arg.shape) if arg.shape is not None else []
        raw_shapes[arg.name] = shape
        specs.append(
            TensorSpec(
                name=arg.name,
                datatype=oip_from_ort(arg.type),
                shape=tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape),
            )
        )
    return tuple(specs), raw_shapes


def synthesize_inputs(
    specs: Iterable[TensorSpec], raw_shapes: Mapping[str, list[int | str | None]], seed: int = 0
) -> dict[str, Array]:
    """Golden inputs made up from a signature, for models given without sample data.

    Dynamic dimensions that share a symbolic name get the same size (batch 2 first, then 8); floats are
    seeded standard normal draws, integers are zero (a valid index for embedding lookups), booleans False.

    Raises:
        PackageBuildError: an input whose datatype cannot be made up, or shapes that hold more than
            `MAX_MADE_UP_VALUES` values over all inputs (checked before anything is allocated).
    """
    sizes: dict[str, int] = {}
    planned: list[tuple[str, list[int], np.dtype[Any]]] = []
    total = 0
    for spec in specs:
        declared = raw_shapes.get(spec.name, list(spec.shape))
        shape: list[int] = []
        for axis, dim in enumerate(declared):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
                continue
            default = 2 if axis == 0 else 8
            if isinstance(dim, str) and dim:
                shape.append(sizes.setdefault(dim, default))
            else:
                shape.append(default)
        dtype = OIP_TO_NUMPY.get(spec.datatype)
        if dtype is None or dtype.kind == "O":
            raise PackageBuildError(
                f"cannot make up golden data for input {spec.name} ({spec.datatype}); give --sample FILE.npz"
            )
        total += math.prod(shape)  # Python integers: no overflow, whatever the model declares
        if total > MAX_MADE_UP_VALUES:
            shown = "[" + ", ".join("?" if d is None else str(d) for d in declared) + "]"
            made = "" if [str(d) for d in declared] == [str(d) for d in shape] else f" (made up as {shape})"
            raise PackageBuildError(
                f"cannot make up golden data for input {spec.name}, declared {shown}{made}: {total} values over "
                f"all inputs, more than the {MAX_MADE_UP_VALUES} made-up inputs may hold; give sample inputs with "
                "--sample FILE.npz"
            )
        planned.append((spec.name, shape, dtype))
    rng = np.random.default_rng(seed)
    feeds: dict[str, Array] = {}
    for name, shape, dtype in planned:  # allocated only once every input is known to fit
        if dtype.kind != "f":
            feeds[name] = np.zeros(shape, dtype=dtype)
        elif dtype == np.float64:
            feeds[name] = rng.standard_normal(shape)
        else:  # drawn as float32, not float64 then a copy (numpy draws no float16: that one is a cast)
            feeds[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    return feeds


def load_samples(path: Path, specs: Iterable[TensorSpec], limit: int = MAX_GOLDEN_SAMPLES) -> dict[str, Array]:
    """Sample inputs from an npz (one array per model input, first axis = samples), cut to `limit` samples.

    Raises:
        PackageBuildError: unreadable file, missing or unknown names, or arrays that do not fit the signature.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise PackageBuildError(f"cannot read samples {path}: {exc}") from exc
    specs = list(specs)
    names = {s.name for s in specs}
    if "labels" not in names:  # the labels `strata optimize` reads from the same file: not an input, not golden
        arrays.pop("labels", None)
    missing = sorted(names - arrays.keys())
    unknown = sorted(arrays.keys() - names)
    if missing or unknown:
        wrong = ([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else [])
        raise PackageBuildError(
            f"samples {path.name} do not match the model's inputs {sorted(names)}: {', '.join(wrong)}"
            " (besides the inputs only 'labels' is allowed)"
        )
    feeds: dict[str, Array] = {}
    for spec in specs:
        array = arrays[spec.name]
        if spec.shape and spec.shape[0] == -1:
            array = array[:limit]
        if not spec.accepts_shape(tuple(array.shape)):
            raise PackageBuildError(
                f"sample {spec.name} has shape {list(array.shape)}; the model expects {list(spec.shape)}"
            )
        want = OIP_TO_NUMPY.get(spec.datatype)
        if want is None or want.kind == "O":
            feeds[spec.name] = array
        elif array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise PackageBuildError(f"sample {spec.name} is {array.dtype}; the model expects {want}")
            feeds[spec.name] = array.astype(want)
        else:
            feeds[spec.name] = array
    return feeds


def _first_samples(feeds: Mapping[str, Array], specs: Iterable[TensorSpec], count: int) -> dict[str, Array]:
    """The first `count` samples of every input whose first axis is the (dynamic) batch."""
    batched = {spec.name for spec in specs if spec.shape and spec.shape[0] == -1}
    return {name: (array[:count] if name in batched else array) for name, array in feeds.items()}


def _drift_section(
    session: Any, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], feeds: Mapping[str, Array]
) -> dict[str, Any]:
    """Reference statistics of every input and output over the sample data, for drift detection on nodes.

    Outputs are computed in batches of 64 when every input is batched on its first axis; otherwise only the
    inputs get references.
    """
    from strata.core.telemetry import build_reference

    references = [build_reference(spec.name, "input", feeds[spec.name]) for spec in inputs]
    samples = min((len(a) for a in feeds.values()), default=0)
    if all(spec.shape and spec.shape[0] == -1 for spec in inputs) and samples:
        names = [o.name for o in outputs]
        chunks = [
            session.run(names, {k: v[start : start + 64] for k, v in feeds.items()}) for start in range(0, samples, 64)
        ]
        for index, spec in enumerate(outputs):
            stacked = np.concatenate([np.asarray(chunk[index]) for chunk in chunks])
            references.append(build_reference(spec.name, "output", stacked))
    tensors = [r.to_json() for r in references if r is not None]
    return {"samples": samples, "bins": "deciles", "tensors": tensors} if tensors else {}


def default_variant_id(profile: str, runtime: str, precision: str) -> str:
    """`<profile>-<precision>`, with the runtime between them when it is not plain onnxruntime."""
    if runtime == "onnxruntime":
        return f"{profile}-{precision}"
    return f"{profile}-{runtime}-{precision}"


def build_package(
    model_path: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    profile: str = "cpu-generic",
    runtime: str = "onnxruntime",
    precision: str = "fp32",
    variant: str | None = None,
    sample: Path | Mapping[str, Array] | None = None,
    metrics: Mapping[str, Any] | None = None,
    policy: Mapping[str, Any] | None = None,
    extra_files: Iterable[Path] = (),
    tolerance: tuple[float, float] | None = None,
    data_files: Mapping[str, Path] | None = None,
) -> Package:
    """Build a package folder from an ONNX model: signature from the graph, golden outputs from onnxruntime.

    Args:
        sample: golden inputs as an npz path or arrays keyed by input name (first axis = samples). Without
            it, inputs are made up from the signature (see `synthesize_inputs`).
        extra_files: files that travel with the model (a tokenizer, a label map, the model's external data),
            placed at the top level. ONNX external data must name one of them, by its file name, or be one of
            `data_files`.
        data_files: the model's external data, by the location its tensors name (`data/weights.bin`): placed at
            that path in the package (`strata optimize` gives its variants' data files so).

    Raises:
        ConfigError: `out_dir` is not an empty folder (or a path to make one at), or a name, version or variant id
            is not valid: usage mistakes.
        PackageBuildError: the model does not load or references external data that is not an extra file, the
            samples do not fit, the golden run fails or gives NaN or infinity.
    """
    from strata.core.profiles import get_profile

    check_name("model name", name, ConfigError)
    check_name("version", version, ConfigError)
    get_profile(profile)
    variant_id = check_name("variant id", variant or default_variant_id(profile, runtime, precision), ConfigError)
    if precision not in DEFAULT_TOLERANCE:
        raise PackageBuildError(f"unknown precision {precision!r}; known: {sorted(DEFAULT_TOLERANCE)}")
    # Where the package goes is the caller's choice, not the package's fault; checked before the model runs.
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output folder {out_dir} is a file; give a new or empty folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"output folder {out_dir} is not empty; give a new or empty folder")
    try:
        model_bytes = model_path.read_bytes()
    except OSError as exc:
        raise PackageBuildError(f"cannot read model {model_path}: {exc}") from exc
    extra_files = list(extra_files)
    data_files = dict(data_files or {})
    extra_names = {extra.name for extra in extra_files}
    folders = {"/".join(parts[:i]) for parts in (loc.split("/") for loc in data_files) for i in range(1, len(parts))}
    for location in data_files:
        try:
            check_location(location)
        except PackageError as exc:
            raise PackageBuildError(f"model external data: {exc}") from exc
        if location in (MANIFEST_NAME, MODEL_NAME, GOLDEN_NAME) or location in extra_names:
            raise PackageBuildError(f"external data file {location} clashes with another file of the package")
        if location in folders or location.split("/", 1)[0] in extra_names:
            raise PackageBuildError(f"external data file {location} is also a folder of another file of the package")
    session = _session(model_bytes, _external_data(model_bytes, extra_files, data_files))
    inputs, raw_shapes = _signature(session.get_inputs())
    outputs, _ = _signature(session.get_outputs())

    reference_feeds: dict[str, Array] | None = None
    if sample is None:
        feeds = synthesize_inputs(inputs, raw_shapes)
    else:
        if isinstance(sample, Path):
            reference_feeds = load_samples(sample, inputs, limit=MAX_REFERENCE_SAMPLES)
        else:
            reference_feeds = dict(sample)
        feeds = _first_samples(reference_feeds, inputs, MAX_GOLDEN_SAMPLES)
    try:
        results = session.run([o.name for o in outputs], feeds)
    except Exception as exc:  # onnxruntime's C++ errors: wrap with what the user can do about it.
        hint = "" if sample is not None else "; give real sample inputs with --sample FILE.npz"
        raise PackageBuildError(f"golden run of {model_path.name} failed: {exc}{hint}") from exc
    expected = {spec.name: np.asarray(value) for spec, value in zip(outputs, results, strict=True)}
    for output_name, value in expected.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise PackageBuildError(
                f"golden run of {model_path.name} gave NaN or infinity in output {output_name}; "
                "give sample inputs the model was trained on with --sample FILE.npz"
            )

    drift = _drift_section(session, inputs, outputs, reference_feeds) if reference_feeds is not None else {}

    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(out_dir / MODEL_NAME, model_bytes)
        golden = io.BytesIO()
        arrays: dict[str, Any] = {f"input:{k}": v for k, v in feeds.items()}
        arrays.update({f"output:{k}": v for k, v in expected.items()})
        np.savez(golden, **arrays)
        write_bytes_atomic(out_dir / GOLDEN_NAME, golden.getvalue())
        entries = [_entry(out_dir, MODEL_NAME, "model"), _entry(out_dir, GOLDEN_NAME, "golden")]
        for extra in extra_files:
            if extra.name in (MANIFEST_NAME, MODEL_NAME, GOLDEN_NAME):
                raise PackageBuildError(f"extra file {extra.name} clashes with a file strata writes")
            try:
                shutil.copyfile(extra, out_dir / extra.name)
            except OSError as exc:
                raise PackageBuildError(f"cannot copy {extra}: {exc}") from exc
            entries.append(_entry(out_dir, extra.name, "data"))
        for location, source in data_files.items():
            target = out_dir / location
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            except OSError as exc:
                raise PackageBuildError(f"cannot copy {source}: {exc}") from exc
            entries.append(_entry(out_dir, location, "data"))

        import onnxruntime as ort

        rtol, atol = tolerance or DEFAULT_TOLERANCE[precision]
        manifest = Manifest(
            name=name,
            version=version,
            variant=variant_id,
            profile=profile,
            runtime=runtime,
            precision=precision,
            model_file=MODEL_NAME,
            inputs=inputs,
            outputs=outputs,
            files=tuple(entries),
            golden=GoldenSpec(file=GOLDEN_NAME, rtol=rtol, atol=atol),
            metrics=dict(metrics or {}),
            policy=dict(policy or {}),
            build={"strata": __version__, "onnxruntime": ort.__version__},
            drift=drift,
        )
        write_manifest(out_dir, manifest)
    except BaseException as exc:
        # nothing half-written stays: a folder it made goes, one it was given empty is emptied again
        _remove_written(out_dir, made)
        if isinstance(exc, OSError):  # a full disk, a folder it may not write
            raise PackageBuildError(f"cannot write the package to {out_dir}: {exc.strerror or exc}") from exc
        raise
    return Package(path=out_dir, manifest=manifest)


def _remove_written(out_dir: Path, made: bool) -> None:
    if made:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    for child in out_dir.iterdir() if out_dir.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Write `manifest.json` (indented for people; the digest is taken over the canonical form)."""
    canonical_json(manifest.to_json())  # fails early on NaN or values JSON cannot hold
    write_bytes_atomic(folder / MANIFEST_NAME, (json.dumps(manifest.to_json(), indent=2) + "\n").encode())


def with_fields(package: Package, **changes: Any) -> Package:
    """A copy of `package` whose manifest has `changes` applied and rewritten (metrics, policy)."""
    manifest = replace(package.manifest, **changes)
    write_manifest(package.path, manifest)
    return Package(path=package.path, manifest=manifest)


def _entry(folder: Path, rel: str, role: str) -> FileEntry:
    sha, size = sha256_file(folder / rel)
    return FileEntry(path=rel, size=size, sha256=sha, role=role, chunks=tuple(chunk_file(folder / rel)))
