"""What "as accurate as the original" means per task: which output to read, and how to compare. Pure numpy.

classification: the predicted class (an integer label output, else the argmax of a score output); compared by
top-1 agreement with the fp32 original, and accuracy when labels are given.
embedding: the sentence embedding (mean of a [batch, seq, dim] output over the attention mask, or a
[batch, dim] output as is), L2-normalised; compared by the cosine similarity of each sample's embeddings.
regression: the first float output; compared by the largest absolute error and that error relative to the
largest absolute reference value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from strata.core.errors import ConfigError
from strata.core.package import TensorSpec

Array = npt.NDArray[Any]

_INTEGER_TYPES = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
_FLOAT_TYPES = {"FP16", "FP32", "FP64"}


@dataclass(frozen=True)
class Task:
    """A kind of model: its default accuracy gate, the metrics it reports and the batch size it is timed at."""

    name: str
    default_gate: str
    metrics: tuple[str, ...]
    throughput_batch: int


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification", "top1_agreement>=0.99", ("top1_agreement", "accuracy", "reference_accuracy"), 64
    ),
    "embedding": Task("embedding", "mean_cosine>=0.99,min_cosine>=0.97", ("mean_cosine", "min_cosine"), 32),
    "regression": Task("regression", "rel_error<=0.01", ("max_abs_error", "mean_abs_error", "rel_error"), 64),
}


def get_task(name: str) -> Task:
    """The task called `name`.

    Raises:
        ConfigError: unknown task.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def choose_output(task: Task, outputs: Sequence[TensorSpec]) -> str:
    """The output the task compares: for classification an integer label output of rank 1, else a float score
    output of rank 2; for the other tasks the first float output.

    Raises:
        ConfigError: the model has no output of the kind the task needs.
    """
    if task.name == "classification":
        for spec in outputs:
            if spec.datatype in _INTEGER_TYPES and len(spec.shape) == 1:
                return spec.name
        for spec in outputs:
            if spec.datatype in _FLOAT_TYPES and len(spec.shape) == 2:
                return spec.name
        raise ConfigError("a classification model needs an integer label output [N] or a float score output [N, C]")
    for spec in outputs:
        if spec.datatype in _FLOAT_TYPES and (task.name != "embedding" or len(spec.shape) in (2, 3)):
            return spec.name
    shapes = "[N, D] or [N, T, D]" if task.name == "embedding" else "float"
    raise ConfigError(f"a {task.name} model needs a {shapes} output; this one has {[s.name for s in outputs]}")


def shape_problem(task: Task, name: str, output: Array, rows: int) -> str | None:
    """Why `output` (output `name` of a run over `rows` samples) cannot give the task one prediction per sample, or
    None when it can. A model's declared output shape is its claim: a regressor declared [N, 1] may return a
    scalar, another [3, N]."""
    shape = list(output.shape)
    if output.ndim == 0 or shape[0] != rows:
        return f"output {name} has shape {shape} for {rows} samples: the optimizer needs the samples on the first axis"
    if task.name == "embedding" and output.ndim not in (2, 3):
        return f"output {name} has shape {shape}: an embedding output is [N, D] or [N, T, D]"
    if task.name == "classification" and output.dtype.kind in "iu" and output.size != rows:
        return f"output {name} has shape {shape}: a label output holds one class id per sample, [N]"
    return None


def prediction(task: Task, output: Array, feeds: Mapping[str, Array], mask: str | None) -> Array:
    """What the task compares, from one batch: class ids, unit-length embeddings or float values per sample.
    `output` is one `shape_problem` finds none in."""
    if task.name == "classification":
        if output.dtype.kind in "iu":
            labels: Array = output.reshape(len(output)).astype(np.int64)
            return labels
        top: Array = np.argmax(output.reshape(len(output), -1), axis=1).astype(np.int64)
        return top
    values = output.astype(np.float64)
    if task.name == "embedding":
        if values.ndim == 3:
            weights = (
                feeds[mask].astype(np.float64)[:, : values.shape[1], None]
                if mask is not None and mask in feeds
                else np.ones((*values.shape[:2], 1))
            )
            values = (values * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        unit: Array = values / np.maximum(norms, 1e-12)
        return unit
    return values.reshape(len(values), -1)


def compare(task: Task, reference: Array, candidate: Array, labels: Array | None = None) -> dict[str, float]:
    """The task's accuracy metrics of `candidate` predictions against the fp32 `reference` predictions.

    Raises:
        ConfigError: the two do not hold the same number of samples, or there are none, or their shapes differ.
    """
    if len(reference) != len(candidate) or len(reference) == 0:
        raise ConfigError(f"cannot compare {len(candidate)} predictions with {len(reference)} reference ones")
    if reference.shape != candidate.shape:  # numpy would broadcast [N, 1] against [N, 3] and compare nonsense
        raise ConfigError(
            f"cannot compare predictions of shape {list(candidate.shape)} with reference ones of shape "
            f"{list(reference.shape)}"
        )
    if task.name == "classification":
        metrics = {"top1_agreement": float(np.mean(reference == candidate))}
        if labels is not None:
            truth = np.asarray(labels).reshape(len(labels))
            metrics["accuracy"] = float(np.mean(candidate == truth))
            metrics["reference_accuracy"] = float(np.mean(reference == truth))
        return metrics
    if task.name == "embedding":
        cosine = np.sum(reference * candidate, axis=1)
        return {"mean_cosine": float(np.mean(cosine)), "min_cosine": float(np.min(cosine))}
    error = np.abs(candidate - reference)
    scale = float(np.max(np.abs(reference)))
    max_error = float(np.max(error))
    return {
        "max_abs_error": max_error,
        "mean_abs_error": float(np.mean(error)),
        "rel_error": max_error / scale if scale > 0 else (0.0 if max_error == 0 else float("inf")),
    }
