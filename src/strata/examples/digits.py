"""A real classifier for scikit-learn's 8x8 digits, exported to ONNX with skl2onnx.

Inputs: `X` (FP32, [-1, 64], pixel values scaled to 0..1). Outputs: `label` (INT64, [-1]) and
`probabilities` (FP32, [-1, 10]). Needs the `demo` extra (scikit-learn, skl2onnx).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from strata.core.errors import ConfigError
from strata.core.fsutil import write_bytes_atomic


@dataclass(frozen=True)
class DigitsData:
    """The digits set split once, so that training, samples and evaluation never share rows."""

    train_x: npt.NDArray[np.float32]
    train_y: npt.NDArray[np.int64]
    test_x: npt.NDArray[np.float32]
    test_y: npt.NDArray[np.int64]


def load_data(seed: int = 0) -> DigitsData:
    """Digits scaled to 0..1, shuffled with `seed`, 80% train and 20% test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigError("the digits example needs scikit-learn: pip install 'strata[demo]'") from exc
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order] / 16.0).astype(np.float32)
    y = y[order].astype(np.int64)
    cut = int(len(x) * 0.8)
    return DigitsData(train_x=x[:cut], train_y=y[:cut], test_x=x[cut:], test_y=y[cut:])


def train_digits(out: Path, hidden: int = 64, seed: int = 0, max_iter: int = 200) -> float:
    """Train an MLP on the digits, write it to `out` as ONNX, and return its held-out accuracy.

    Different `hidden` or `seed` values give different, equally real model versions.

    Raises:
        ConfigError: scikit-learn or skl2onnx is not installed.
    """
    try:
        from skl2onnx import to_onnx
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError as exc:
        raise ConfigError("the digits example needs scikit-learn and skl2onnx: pip install 'strata[demo]'") from exc
    data = load_data()
    model = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(data.train_x, data.train_y)
    options: dict[int, Any] = {id(model): {"zipmap": False}}
    onnx_model = to_onnx(model, data.train_x[:1], options=options, target_opset=17)
    write_bytes_atomic(out, onnx_model.SerializeToString())
    return float(model.score(data.test_x, data.test_y))


def main(argv: list[str] | None = None) -> None:
    """`python -m strata.examples.digits OUT.onnx [--hidden N] [--seed S]`: a model to try strata with (the README's
    quick tour); prints its held-out accuracy."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m strata.examples.digits", description=main.__doc__)
    parser.add_argument("out", type=Path, help="the ONNX file to write")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units: another value, another model version")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    args = parser.parse_args(argv)
    accuracy = train_digits(args.out, hidden=args.hidden, seed=args.seed)
    print(f"{args.out}: digits classifier, held-out accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
