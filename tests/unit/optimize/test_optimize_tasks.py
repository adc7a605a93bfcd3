"""Task metrics: top-1 agreement, pooled cosine similarity and regression errors, on arrays made here."""

from __future__ import annotations

import numpy as np
import pytest

from strata.core.errors import ConfigError
from strata.core.package import TensorSpec
from strata.optimize.tasks import choose_output, compare, get_task, prediction, shape_problem

CLS, EMB, REG = get_task("classification"), get_task("embedding"), get_task("regression")


def test_classification_reads_labels_or_argmax_and_compares() -> None:
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    assert prediction(CLS, scores, {}, None).tolist() == [1, 0, 1, 0]
    assert prediction(CLS, np.array([3, 1], dtype=np.int64), {}, None).tolist() == [3, 1]
    metrics = compare(CLS, np.array([1, 0, 1, 0]), np.array([1, 0, 0, 0]), labels=np.array([1, 1, 1, 0]))
    assert metrics == {"top1_agreement": 0.75, "accuracy": 0.5, "reference_accuracy": 0.75}


def test_embedding_pools_over_the_mask_only() -> None:
    hidden = np.zeros((2, 3, 2), dtype=np.float32)
    hidden[0, 0] = [1, 0]
    hidden[0, 1] = [1, 0]
    hidden[0, 2] = [0, 100]  # padding: must not count
    hidden[1] = [[0, 1], [0, 1], [0, 1]]
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    pooled = prediction(EMB, hidden, {"attention_mask": mask}, "attention_mask")
    np.testing.assert_allclose(pooled, [[1, 0], [0, 1]])
    unmasked = prediction(EMB, hidden, {}, None)
    assert unmasked[0, 1] > 0.9


def test_embedding_cosine_mean_and_min() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [np.sqrt(0.5), np.sqrt(0.5)]])
    metrics = compare(EMB, reference, candidate)
    assert metrics["min_cosine"] == pytest.approx(np.sqrt(0.5))
    assert metrics["mean_cosine"] == pytest.approx((1 + np.sqrt(0.5)) / 2)


def test_regression_errors_are_relative_to_the_reference_range() -> None:
    reference = np.array([[10.0], [-20.0]])
    candidate = np.array([[10.5], [-20.0]])
    metrics = compare(REG, reference, candidate)
    assert metrics == {"max_abs_error": 0.5, "mean_abs_error": 0.25, "rel_error": 0.025}


def test_compare_refuses_mismatched_or_empty_sets() -> None:
    with pytest.raises(ConfigError):
        compare(CLS, np.array([1, 2]), np.array([1]))
    with pytest.raises(ConfigError):
        compare(EMB, np.zeros((0, 2)), np.zeros((0, 2)))


def test_choose_output_per_task() -> None:
    outputs = (TensorSpec("label", "INT64", (-1,)), TensorSpec("probabilities", "FP32", (-1, 10)))
    assert choose_output(CLS, outputs) == "label"
    assert choose_output(CLS, outputs[1:]) == "probabilities"
    assert choose_output(EMB, (TensorSpec("last_hidden_state", "FP32", (-1, -1, 384)),)) == "last_hidden_state"
    with pytest.raises(ConfigError, match="classification"):
        choose_output(CLS, (TensorSpec("y", "FP32", (-1, 2, 2)),))
    with pytest.raises(ConfigError, match="embedding"):
        choose_output(EMB, (TensorSpec("ids", "INT64", (-1,)),))
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("segmentation")


def test_an_output_without_one_row_per_sample_has_its_problem_named() -> None:
    regression, embedding, classification = (get_task(n) for n in ("regression", "embedding", "classification"))
    rows = 4
    assert shape_problem(regression, "Y", np.zeros((4, 1), np.float32), rows) is None
    assert shape_problem(regression, "Y", np.ones((), np.float32), rows) == (
        "output Y has shape [] for 4 samples: the optimizer needs the samples on the first axis"
    )
    assert shape_problem(regression, "Y", np.zeros((3, 4), np.float32), rows) == (
        "output Y has shape [3, 4] for 4 samples: the optimizer needs the samples on the first axis"
    )
    assert shape_problem(embedding, "E", np.zeros(4, np.float32), rows) == (
        "output E has shape [4]: an embedding output is [N, D] or [N, T, D]"
    )
    assert shape_problem(classification, "L", np.zeros((4, 3), np.int64), rows) == (
        "output L has shape [4, 3]: a label output holds one class id per sample, [N]"
    )
    assert shape_problem(classification, "S", np.zeros((4, 3), np.float32), rows) is None


def test_predictions_of_another_shape_than_the_reference_are_not_compared() -> None:
    """numpy would broadcast [N, 1] against [N, 3] and report an error that means nothing."""
    with pytest.raises(ConfigError, match=r"shape \[4, 3\] with reference ones of shape \[4, 1\]"):
        compare(get_task("regression"), np.zeros((4, 1)), np.zeros((4, 3)))
