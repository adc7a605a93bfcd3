"""Turning variants into strata packages: one per kept variant under DIR, and one per target for the registry.

ONNX variants go through `strata.package_build.build_package`. OpenVINO variants are an IR (`model.xml` + `model.bin`)
that onnxruntime cannot run, so `build_openvino_package` writes the same manifest with OpenVINO computing the
golden outputs. The measurements travel in the manifest's `metrics`, flattened to scalars so that
`strata model show` can print them.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from strata import __version__
from strata.core.errors import ConfigError, PackageBuildError
from strata.core.fsutil import write_bytes_atomic
from strata.core.hashing import sha256_file
from strata.core.openvino_import import import_openvino
from strata.core.package import (
    DEFAULT_TOLERANCE,
    GOLDEN_NAME,
    FileEntry,
    GoldenSpec,
    Manifest,
    Package,
    TensorSpec,
    check_name,
    load_golden,
    read_package,
)
from strata.optimize.base import external_data_files
from strata.optimize.report import VariantResult
from strata.optimize.runners import OpenVinoRunner
from strata.package_build import build_package, write_manifest

Array = npt.NDArray[Any]


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def package_metrics(variant: VariantResult, host_profile: str) -> dict[str, Any]:
    """The variant's measurements as flat scalars for a manifest's `metrics`."""
    metrics: dict[str, Any] = {k: _round(v) for k, v in sorted(variant.accuracy.items())}
    if variant.latency_ms is not None:
        metrics["latency_p50_ms"] = _round(variant.latency_ms["p50"])
        metrics["latency_p95_ms"] = _round(variant.latency_ms["p95"])
    for key, value in (("throughput", variant.throughput), ("speedup", variant.speedup)):
        if value is not None:
            metrics[key] = _round(value)
    if variant.size_bytes is not None:
        metrics["size_bytes"] = variant.size_bytes
    if variant.peak_memory_bytes is not None:
        metrics["peak_memory_bytes"] = variant.peak_memory_bytes
    metrics["gate"] = variant.gate
    metrics["optimized_as"] = variant.id
    metrics["measured_on"] = host_profile if variant.verified else "nowhere (unverified)"
    return metrics


def build_openvino_package(
    xml_path: Path,
    out_dir: Path,
    *,
    name: str,
    version: str,
    profile: str,
    precision: str,
    variant: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    sample: Mapping[str, Array],
    metrics: Mapping[str, Any],
) -> Package:
    """A package holding an OpenVINO IR, with golden outputs computed by OpenVINO on `sample`.

    Raises:
        PackageBuildError: the IR does not compile or run, gives NaN, or `out_dir` is not empty.
        ConfigError: a name is not valid.
    """
    check_name("model name", name, ConfigError)
    check_name("version", version, ConfigError)
    check_name("variant id", variant, ConfigError)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PackageBuildError(f"output folder {out_dir} is not empty")
    ov = import_openvino()
    try:
        expected = OpenVinoRunner(xml_path, precision=precision).run(sample)
    except Exception as exc:  # OptimizationError, and OpenVINO's own errors
        raise PackageBuildError(f"golden run of {xml_path.name} with OpenVINO failed: {exc}") from exc
    wanted = {spec.name for spec in outputs}
    expected = {k: np.asarray(v) for k, v in expected.items() if k in wanted}
    if any(v.dtype.kind == "f" and not np.all(np.isfinite(v)) for v in expected.values()):
        raise PackageBuildError(f"golden run of {xml_path.name} gave NaN or infinity")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(xml_path, out_dir / "model.xml")
        shutil.copyfile(xml_path.with_suffix(".bin"), out_dir / "model.bin")
    except OSError as exc:
        raise PackageBuildError(f"cannot copy the OpenVINO IR: {exc}") from exc
    golden = io.BytesIO()
    arrays: dict[str, Any] = {f"input:{k}": v for k, v in sample.items()}
    arrays.update({f"output:{k}": v for k, v in expected.items()})
    np.savez(golden, **arrays)
    write_bytes_atomic(out_dir / GOLDEN_NAME, golden.getvalue())
    entries = []
    for rel, role in (("model.xml", "model"), ("model.bin", "weights"), (GOLDEN_NAME, "golden")):
        sha, size = sha256_file(out_dir / rel)
        entries.append(FileEntry(path=rel, size=size, sha256=sha, role=role))
    rtol, atol = DEFAULT_TOLERANCE[precision]
    manifest = Manifest(
        name=name,
        version=version,
        variant=variant,
        profile=profile,
        runtime="openvino",
        precision=precision,
        model_file="model.xml",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        files=tuple(entries),
        golden=GoldenSpec(file=GOLDEN_NAME, rtol=rtol, atol=atol),
        metrics=dict(metrics),
        build={"strata": __version__, "openvino": str(ov.__version__)},
    )
    write_manifest(out_dir, manifest)
    return Package(path=out_dir, manifest=manifest)


def build_variant_package(
    model_files: Sequence[Path],
    out_dir: Path,
    *,
    name: str,
    version: str,
    profile: str,
    runtime: str,
    precision: str,
    variant: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    sample: Mapping[str, Array],
    metrics: Mapping[str, Any],
) -> Package:
    """A package for one variant, whichever its runtime (see the module docstring).

    Raises:
        PackageBuildError, PackageError: as `build_package` and `build_openvino_package`.
    """
    model = model_files[0]
    if runtime == "openvino":
        return build_openvino_package(
            model,
            out_dir,
            name=name,
            version=version,
            profile=profile,
            precision=precision,
            variant=variant,
            inputs=inputs,
            outputs=outputs,
            sample=sample,
            metrics=metrics,
        )
    return build_package(
        model,
        out_dir,
        name=name,
        version=version,
        profile=profile,
        runtime=runtime,
        precision=precision,
        variant=variant,
        sample=dict(sample),
        metrics=metrics,
        data_files={path.relative_to(model.parent).as_posix(): path for path in model_files[1:]},  # external data
    )


def repackage_for_target(source: Path, out_dir: Path, *, profile: str, variant: str) -> Package:
    """The package at `source` again, built for `profile` under the id `variant` (same model, golden inputs
    and metrics): how a selected variant becomes the package a target profile's nodes pick first.

    Raises:
        PackageError, VerificationError: `source` is not a valid package.
        PackageBuildError: the package cannot be rebuilt.
    """
    package = read_package(source)
    manifest = package.manifest
    sample, _ = load_golden(package)
    model = package.path / manifest.model_file
    if manifest.runtime == "openvino":
        model_files = [model, package.path / "model.bin"]
    else:
        model_files = [model, *external_data_files(model)]  # the model and its external data
    return build_variant_package(
        model_files,
        out_dir,
        name=manifest.name,
        version=manifest.version,
        profile=profile,
        runtime=manifest.runtime,
        precision=manifest.precision,
        variant=variant,
        inputs=manifest.inputs,
        outputs=manifest.outputs,
        sample=sample,
        metrics=manifest.metrics,
    )
