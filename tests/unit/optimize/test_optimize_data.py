"""Loading DATA against a model's inputs, trimming padding, and keeping calibration, evaluation and benchmark
samples apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from strata.core.errors import ConfigError
from strata.core.package import TensorSpec
from strata.optimize.data import Feeds, load_data, load_npz, plan_splits, tokenize, trim_padding

X_SPEC = (TensorSpec("X", "FP32", (-1, 4)),)


def npz(tmp_path: Path, **arrays: np.ndarray) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


def test_npz_fits_the_inputs_and_keeps_labels(tmp_path: Path) -> None:
    feeds = load_npz(npz(tmp_path, X=np.ones((5, 4), np.float64), labels=np.arange(5)), X_SPEC)
    assert len(feeds) == 5
    assert feeds.arrays["X"].dtype == np.float32
    assert feeds.labels is not None
    assert feeds.labels.tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"Y": np.ones((5, 4), np.float32)}, r"missing \['X'\], unknown \['Y'\]"),
        ({"X": np.ones((5, 4), np.float32), "Z": np.ones(5)}, r"unknown \['Z'\]"),
        ({"X": np.ones((5, 3), np.float32)}, r"has shape \[5, 3\]; the model expects \[-1, 4\]"),
        ({"X": np.ones((5,), np.float32)}, "has shape"),
        ({"X": np.ones((5, 4), np.int64)}, "is int64; the model expects float32"),
        ({"X": np.ones((0, 4), np.float32)}, "holds no samples"),
        ({"X": np.ones((5, 4), np.float32), "labels": np.arange(3)}, "different numbers of samples"),
    ],
)
def test_npz_that_does_not_fit_is_a_clear_error(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_npz(npz(tmp_path, **arrays), X_SPEC)


def test_unreadable_npz_and_text_without_tokenizer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot read"):
        load_npz(bad, X_SPEC)
    text = tmp_path / "s.txt"
    text.write_text("One sentence.\n")
    with pytest.raises(ConfigError, match="--tokenizer"):
        load_data(text, X_SPEC)


def test_a_missing_data_file_or_tokenizer_is_said_as_such(tmp_path: Path) -> None:
    """A data file that is not there reads as missing (it used to read as "not an .npz; text data needs
    --tokenizer"); a tokenizer that is not there is refused even beside an `.npz`, which does not use it (it was
    ignored)."""
    with pytest.raises(ConfigError, match=r"calib\.txt: no such file"):
        load_data(tmp_path / "calib.txt", X_SPEC)
    with pytest.raises(ConfigError, match=r"tokenizer .*missing\.json: no such file"):
        load_data(npz(tmp_path, X=np.ones((5, 4), np.float32)), X_SPEC, tokenizer=tmp_path / "missing.json")


def _word_tokenizer(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "the": 2, "cat": 3, "sat": 4, "on": 5, "mat": 6}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


TEXT_SPECS = (
    TensorSpec("input_ids", "INT64", (-1, -1)),
    TensorSpec("attention_mask", "INT64", (-1, -1)),
    TensorSpec("token_type_ids", "INT64", (-1, -1)),
)


def test_text_is_tokenized_padded_and_batches_drop_unused_padding(tmp_path: Path) -> None:
    feeds = tokenize(["the cat", "the cat sat on the mat", "cat"], _word_tokenizer(tmp_path), TEXT_SPECS, 8)
    assert feeds.arrays["input_ids"].shape == (3, 8)
    assert feeds.mask == "attention_mask"
    assert feeds.arrays["input_ids"][0].tolist() == [2, 3, 0, 0, 0, 0, 0, 0]
    first = feeds.batch(0, 1)
    assert first["input_ids"].tolist() == [[2, 3]]
    assert first["attention_mask"].tolist() == [[1, 1]]
    assert feeds.batch(0, 3)["input_ids"].shape == (3, 6)
    truncated = tokenize(["the cat sat on the mat"], _word_tokenizer(tmp_path), TEXT_SPECS, 3)
    assert truncated.arrays["input_ids"].tolist() == [[2, 3, 4]]


def test_text_for_a_model_without_text_inputs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="input_ids"):
        tokenize(["the cat"], _word_tokenizer(tmp_path), X_SPEC, 8)
    with pytest.raises(ConfigError, match="no sentences"):
        tokenize([], _word_tokenizer(tmp_path), TEXT_SPECS, 8)


def test_trim_padding_leaves_feeds_without_a_mask_alone() -> None:
    feeds = {"X": np.ones((2, 5))}
    assert trim_padding(feeds, None)["X"].shape == (2, 5)
    masked = {"ids": np.ones((2, 5)), "mask": np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]), "other": np.ones(2)}
    trimmed = trim_padding(masked, "mask")
    assert trimmed["ids"].shape == (2, 2)
    assert trimmed["other"].shape == (2,)


def test_fingerprints_see_equal_samples_as_equal() -> None:
    feeds = Feeds({"X": np.array([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]], np.float32)})
    digests = feeds.fingerprints()
    assert digests[0] == digests[2] != digests[1]


def test_one_source_is_split_deterministically_into_disjoint_sets() -> None:
    fingerprints = [f"s{i}" for i in range(20)] + ["s0"]  # one duplicate
    splits = plan_splits(fingerprints, None, seed=3)
    again = plan_splits(fingerprints, None, seed=3)
    assert splits == again
    groups = [set(splits.calibration), set(splits.evaluation), set(splits.benchmark)]
    assert all(groups)
    assert not (groups[0] & groups[1])
    assert not (groups[0] & groups[2])
    assert not (groups[1] & groups[2])
    assert splits.dropped_duplicates == 1
    assert sum(len(g) for g in groups) == 20
    assert splits.method.startswith("split")
    assert plan_splits(fingerprints, None, seed=4) != splits


def test_two_sources_must_be_disjoint() -> None:
    splits = plan_splits(["a", "b"], ["c", "d", "e", "f"])
    assert splits.calibration == (0, 1)
    assert splits.evaluation == (0, 1, 2)
    assert splits.benchmark == (3,)
    assert splits.method.startswith("disjoint")
    with pytest.raises(ConfigError, match="1 sample"):
        plan_splits(["a", "b"], ["c", "b", "e"])


@pytest.mark.parametrize(
    ("calibration", "evaluation", "message"),
    [
        (["a"], [], "evaluation data holds no samples"),
        ([], ["a", "b"], "calibration data holds no samples"),
        (["a"], ["b"], "at least 2"),
        (["a"], ["b", "b"], "at least 2"),
        (["a", "b", "a"], None, "at least 3"),
    ],
)
def test_too_little_data_is_a_clear_error(calibration: list[str], evaluation: list[str] | None, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_splits(calibration, evaluation)
