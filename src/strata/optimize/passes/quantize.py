"""What the onnxruntime quantization passes share: pre-processing and the calibration data reader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy.typing as npt

from strata.core.errors import OptimizationError
from strata.core.profiles import Profile
from strata.optimize.base import EXTERNAL_DATA_THRESHOLD, external_data_files
from strata.optimize.data import Feeds

Array = npt.NDArray[Any]

PREPROCESSED_NAME = "preprocessed.onnx"


def needs_reduce_range(arch: str, cpu_features: frozenset[str]) -> bool:
    """True on x86-64 CPUs without VNNI (u8s8 saturation), the case onnxruntime recommends reduce_range for."""
    return arch == "x86_64" and not ({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_features)


def int8_profile(host: Profile, signed_weights: bool, reduce_range: bool) -> str:
    """The profile an onnxruntime int8 variant measured on `host` (its ISA profile) is good for.

    int8 weights at full range run in onnxruntime's u8s8 kernels, which on x86-64 without VNNI sum pairs of
    products into int16 (VPMADDUBSW) and saturate: measured on a host that does not saturate (VNNI, or another
    architecture) their accuracy holds for that host's ISA only (a one-layer BERT: mean cosine 0.9992 there,
    0.972 under an AVX2-only CPU). 7-bit or uint8 weights, or a measurement on a CPU that saturates (the worst
    case), hold on every CPU.
    """
    if signed_weights and not reduce_range and not needs_reduce_range(host.arch, host.cpu_features):
        return host.id
    return "cpu-generic"


def preprocess(model_path: Path, workdir: Path) -> tuple[Path, str]:
    """onnxruntime's quantization pre-processing (shape inference, then graph optimization), once per workdir.

    Symbolic shape inference needs sympy and gives up on some graphs; then it is skipped, as onnxruntime's own
    message suggests, and onnx shape inference alone runs. Returns the model to quantize and what was done.

    Raises:
        OptimizationError: even the reduced pre-processing fails.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = workdir / PREPROCESSED_NAME
    done = workdir / (PREPROCESSED_NAME + ".how")
    if out.is_file() and done.is_file():
        return out, done.read_text()
    external: dict[str, Any] = {}
    if external_data_files(model_path):  # written with its own data file beside it (see `strata.optimize.base`)
        external = {
            "save_as_external_data": True,
            "all_tensors_to_one_file": True,
            "external_data_location": out.name + ".data",
            "external_data_size_threshold": EXTERNAL_DATA_THRESHOLD,
        }
    data = out.with_name(out.name + ".data")
    try:
        data.unlink(missing_ok=True)  # onnx appends to a data file that is there
        quant_pre_process(str(model_path), str(out), **external)
        how = "quant-pre-process"
    except Exception:  # ImportError without sympy, or "Incomplete symbolic shape inference"
        try:
            data.unlink(missing_ok=True)  # what the first try wrote
            quant_pre_process(str(model_path), str(out), skip_symbolic_shape=True, **external)
        except Exception as exc:  # onnx and onnxruntime errors
            raise OptimizationError(f"quantization pre-processing failed: {exc}") from exc
        how = "quant-pre-process:skip-symbolic-shape"
    done.write_text(how)
    return out, how


class FeedsReader:
    """An onnxruntime `CalibrationDataReader` over calibration feeds, one sample at a time.

    Padding columns that no calibration sample uses are dropped, but every sample keeps the same width: the
    histogram calibrators (Entropy, Percentile) stack the activations of all samples into one array. With
    `own_length` each sample is cut to its own length instead (MinMax reduces each run to a minimum and a
    maximum, so widths may differ), and padding tokens' activations never reach the calibrated ranges.
    """

    def __init__(self, feeds: Feeds, limit: int, own_length: bool = False) -> None:
        count = min(limit, len(feeds))
        self._feeds = feeds
        self._rows = feeds.batch(0, count)
        self._count = count
        self._own_length = own_length
        self._iter: Iterator[dict[str, Array]] = self._samples()

    def _samples(self) -> Iterator[dict[str, Array]]:
        for row in range(self._count):
            if self._own_length:
                yield self._feeds.batch(row, row + 1)
            else:
                yield {name: array[row : row + 1] for name, array in self._rows.items()}

    def get_next(self) -> dict[str, Array] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = self._samples()
