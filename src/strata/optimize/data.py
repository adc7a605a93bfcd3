"""Calibration and evaluation data: loading it against a model's inputs, and keeping the sets apart.

DATA is an `.npz` with one array per model input (first axis = samples) and an optional `labels` array, or a
text file with one sentence a line that a `tokenizers` tokenizer turns into the model's inputs. Text is padded
to a fixed length and the attention mask is remembered, so that batches can drop the padding columns that no row
of the batch needs (what a server does with dynamic padding; the outputs for real tokens do not change).

Calibration, evaluation and benchmarking must never see the same sample. `plan_splits` decides how: two
different sources are checked to be disjoint, one source given twice is split deterministically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from strata.core.datatypes import OIP_TO_NUMPY
from strata.core.errors import ConfigError
from strata.core.package import TensorSpec

Array = npt.NDArray[Any]

LABELS_KEY = "labels"
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MASK_INPUT = "attention_mask"


@dataclass(frozen=True)
class Feeds:
    """Model inputs for a set of samples: one array per input, first axis = samples."""

    arrays: Mapping[str, Array]
    labels: Array | None = None
    mask: str | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def take(self, indices: Sequence[int] | Array) -> Feeds:
        """The samples at `indices`, in that order."""
        index = np.asarray(indices, dtype=np.int64)
        return Feeds(
            arrays={name: array[index] for name, array in self.arrays.items()},
            labels=None if self.labels is None else self.labels[index],
            mask=self.mask,
            source=self.source,
        )

    def batch(self, start: int, stop: int) -> dict[str, Array]:
        """Rows `start:stop` as feeds, without the trailing padding columns no row of them uses."""
        rows = {name: array[start:stop] for name, array in self.arrays.items()}
        return trim_padding(rows, self.mask)

    def fingerprints(self) -> list[str]:
        """One digest per sample over all of its input arrays (labels excluded): equal samples, equal digests."""
        digests = []
        names = sorted(self.arrays)
        for row in range(len(self)):
            h = hashlib.sha256()
            for name in names:
                value = np.ascontiguousarray(self.arrays[name][row])
                h.update(name.encode() + b"\0" + str(value.dtype).encode() + str(value.shape).encode())
                h.update(value.tobytes())
            digests.append(h.hexdigest())
        return digests


def trim_padding(feeds: Mapping[str, Array], mask: str | None) -> dict[str, Array]:
    """Cut the sequence axis of every 2-D+ input to the last column where `feeds[mask]` is non-zero."""
    if mask is None or mask not in feeds:
        return dict(feeds)
    mask_array = feeds[mask]
    if mask_array.ndim != 2 or mask_array.size == 0:
        return dict(feeds)
    used = np.nonzero(mask_array.any(axis=0))[0]
    length = int(used[-1]) + 1 if used.size else 1
    width = mask_array.shape[1]
    return {
        name: array[:, :length] if array.ndim >= 2 and array.shape[1] == width else array
        for name, array in feeds.items()
    }


# --- loading ---------------------------------------------------------------------------------------------


def _fit(spec: TensorSpec, array: Array, where: str) -> Array:
    got = tuple(array.shape)
    fits = len(got) == len(spec.shape) and all(w in (-1, g) for w, g in zip(spec.shape[1:], got[1:], strict=True))
    if not fits:
        raise ConfigError(
            f"{where}: input {spec.name!r} has shape {list(got)}; the model expects {list(spec.shape)} "
            "(first axis = samples)"
        )
    want = OIP_TO_NUMPY.get(spec.datatype)
    if want is None or want.kind == "O":
        raise ConfigError(f"{where}: input {spec.name!r} is {spec.datatype}, which strata cannot calibrate with")
    if array.dtype == want:
        return array
    same_kind = np.can_cast(array.dtype, want, casting="same_kind")
    if not same_kind or array.dtype.kind != want.kind:
        raise ConfigError(f"{where}: input {spec.name!r} is {array.dtype}; the model expects {want}")
    return array.astype(want)


def load_npz(path: Path, inputs: Sequence[TensorSpec]) -> Feeds:
    """Read an `.npz` of input feeds (plus optional `labels`) and check it against the model's inputs.

    Raises:
        ConfigError: unreadable file, names that are not the model's inputs, shapes or datatypes that do not
            fit, arrays with different sample counts, or no samples at all.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as .npz: {exc}") from exc
    labels = arrays.pop(LABELS_KEY, None)
    names = [spec.name for spec in inputs]
    missing = sorted(set(names) - arrays.keys())
    unknown = sorted(arrays.keys() - set(names))
    if missing or unknown:
        raise ConfigError(
            f"{path.name} does not match the model's inputs {names}: missing {missing}, unknown {unknown}"
            f" (besides the inputs only {LABELS_KEY!r} is allowed)"
        )
    feeds = {spec.name: _fit(spec, arrays[spec.name], path.name) for spec in inputs}
    counts = {name: len(array) for name, array in feeds.items()}
    if labels is not None:
        counts[LABELS_KEY] = len(labels)
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{path.name}: arrays hold different numbers of samples: {counts}")
    if not counts or next(iter(counts.values())) == 0:
        raise ConfigError(f"{path.name} holds no samples")
    mask = MASK_INPUT if MASK_INPUT in feeds and feeds[MASK_INPUT].ndim == 2 else None
    return Feeds(arrays=feeds, labels=labels, mask=mask, source=str(path))


def read_lines(path: Path) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped.

    Raises:
        ConfigError: unreadable or not UTF-8.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def tokenize(
    sentences: Sequence[str], tokenizer_path: Path, inputs: Sequence[TensorSpec], max_length: int, source: str = ""
) -> Feeds:
    """Turn sentences into the model's text inputs with a `tokenizers` tokenizer, padded to `max_length`.

    Raises:
        ConfigError: no sentences, a tokenizer that does not load, or model inputs that are not the usual
            `input_ids`, `attention_mask`, `token_type_ids`.
    """
    if not sentences:
        raise ConfigError(f"{source or 'text data'} holds no sentences")
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, not {max_length}")
    unknown = [spec.name for spec in inputs if spec.name not in TEXT_INPUTS]
    if unknown or "input_ids" not in {spec.name for spec in inputs}:
        raise ConfigError(
            f"text data fits models whose inputs are among {list(TEXT_INPUTS)} (with input_ids); "
            f"this model's inputs are {[s.name for s in inputs]}; give an .npz instead"
        )
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ConfigError("text data needs the tokenizers package: pip install 'strata[optimize]'") from exc
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # tokenizers raises a bare Exception from Rust for unreadable files.
        raise ConfigError(f"cannot load tokenizer {tokenizer_path}: {exc}") from exc
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length)
    encodings = tokenizer.encode_batch(list(sentences))
    columns = {
        "input_ids": [e.ids for e in encodings],
        "attention_mask": [e.attention_mask for e in encodings],
        "token_type_ids": [e.type_ids for e in encodings],
    }
    arrays: dict[str, Array] = {}
    for spec in inputs:
        arrays[spec.name] = _fit(spec, np.asarray(columns[spec.name], dtype=np.int64), source or "text data")
    mask = MASK_INPUT if MASK_INPUT in arrays else None
    return Feeds(arrays=arrays, labels=None, mask=mask, source=source)


def load_data(path: Path, inputs: Sequence[TensorSpec], tokenizer: Path | None = None, max_length: int = 128) -> Feeds:
    """Load DATA: an `.npz` of feeds, or a text file (one sentence a line) with `tokenizer`.

    Raises:
        ConfigError: as `load_npz` and `tokenize`; a file that is not there; a text file given without a tokenizer;
            a tokenizer that is not there (given with an `.npz`, which does not use it, it would be ignored).
    """
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if tokenizer is not None and not tokenizer.is_file():
        raise ConfigError(f"tokenizer {tokenizer}: no such file")
    if path.suffix == ".npz":
        return load_npz(path, inputs)
    if tokenizer is None:
        raise ConfigError(f"{path} is not an .npz; text data (one sentence a line) needs --tokenizer tokenizer.json")
    return tokenize(read_lines(path), tokenizer, inputs, max_length, source=str(path))


# --- keeping calibration, evaluation and benchmark samples apart ------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Which samples each stage uses, as indices into the calibration and evaluation sources."""

    calibration: tuple[int, ...]
    evaluation: tuple[int, ...]
    benchmark: tuple[int, ...]
    method: str
    dropped_duplicates: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "calibration_samples": len(self.calibration),
            "evaluation_samples": len(self.evaluation),
            "benchmark_samples": len(self.benchmark),
            "dropped_duplicates": self.dropped_duplicates,
        }


def _unique(fingerprints: Sequence[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for index, digest in enumerate(fingerprints):
        if digest not in seen:
            seen.add(digest)
            keep.append(index)
    return keep


def _cut_benchmark(evaluation: list[int], benchmark_fraction: float) -> tuple[list[int], list[int]]:
    if len(evaluation) < 2:
        raise ConfigError(
            f"the evaluation data holds {len(evaluation)} distinct sample(s); at least 2 are needed "
            "(evaluation and benchmarking use different samples)"
        )
    bench_count = min(len(evaluation) - 1, max(1, round(len(evaluation) * benchmark_fraction)))
    return evaluation[: len(evaluation) - bench_count], evaluation[len(evaluation) - bench_count :]


def plan_splits(
    calibration: Sequence[str],
    evaluation: Sequence[str] | None,
    *,
    seed: int = 0,
    calibration_fraction: float = 0.5,
    benchmark_fraction: float = 0.25,
) -> Splits:
    """Decide which samples calibrate, which evaluate accuracy and which are timed. Pure.

    `calibration` and `evaluation` are per-sample fingerprints (`Feeds.fingerprints`); `evaluation` is None when
    both stages were given the same source. Then the distinct samples are shuffled with `seed` and split;
    otherwise the two sources must share no sample. The evaluation samples are cut once more: the last
    `benchmark_fraction` of them are only timed, never scored.

    Raises:
        ConfigError: no evaluation samples, too few to split, or samples present in both sources.
    """
    if evaluation is None:
        distinct = _unique(calibration)
        dropped = len(calibration) - len(distinct)
        if len(distinct) < 3:
            raise ConfigError(
                f"the data holds {len(distinct)} distinct sample(s); splitting it into calibration, evaluation and "
                "benchmark sets needs at least 3"
            )
        order = [distinct[i] for i in np.random.default_rng(seed).permutation(len(distinct))]
        cut = min(len(order) - 2, max(1, round(len(order) * calibration_fraction)))
        accuracy, bench = _cut_benchmark(order[cut:], benchmark_fraction)
        return Splits(
            calibration=tuple(order[:cut]),
            evaluation=tuple(accuracy),
            benchmark=tuple(bench),
            method=f"split: one source, shuffled with seed {seed}, {cut} calibration samples",
            dropped_duplicates=dropped,
        )
    if not evaluation:
        raise ConfigError("the evaluation data holds no samples")
    if not calibration:
        raise ConfigError("the calibration data holds no samples")
    overlap = set(calibration) & set(evaluation)
    if overlap:
        raise ConfigError(
            f"{len(overlap)} sample(s) appear in both the calibration and the evaluation data; "
            "give disjoint sets, or the same file for both to have it split"
        )
    calib = _unique(calibration)
    evaluation_unique = _unique(evaluation)
    dropped = len(calibration) - len(calib) + len(evaluation) - len(evaluation_unique)
    accuracy, bench = _cut_benchmark(evaluation_unique, benchmark_fraction)
    return Splits(
        calibration=tuple(calib),
        evaluation=tuple(accuracy),
        benchmark=tuple(bench),
        method="disjoint: two sources, checked to share no sample; evaluation source cut into scored and timed",
        dropped_duplicates=dropped,
    )
