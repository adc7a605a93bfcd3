"""Fixtures shared by every test: real models made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The workspace's shared folder sits beside the checkout (../shared); STRATA_SHARED_DIR points elsewhere.
SHARED_DIR = Path(os.environ.get("STRATA_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_MINILM = SHARED_DIR / "models" / "minilm"


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real MLP trained on scikit-learn's digits, exported to ONNX (about 3 s, once per session)."""
    from strata.examples.digits import train_digits

    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    accuracy = train_digits(path)
    assert accuracy > 0.9
    return path


@pytest.fixture(scope="session")
def digits_onnx_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different digits model: the next version of the same model."""
    from strata.examples.digits import train_digits

    path = tmp_path_factory.mktemp("digits-v2") / "digits.onnx"
    train_digits(path, hidden=32, seed=1)
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real MiniLM sentence-embedding model from ../shared (present on developer machines and CI)."""
    if not (SHARED_MINILM / "model.onnx").is_file():
        pytest.skip("../shared/models/minilm is not on this machine (it ships with the strata workspace, not PyPI)")
    return SHARED_MINILM
