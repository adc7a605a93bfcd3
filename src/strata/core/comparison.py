"""The gate language: one comparison `METRIC OP NUMBER`, parsed (never eval'd) and judged, no I/O.

    comparison := METRIC OP NUMBER ["%"]
    OP         := ">=" | "<=" | ">" | "<" | "=="

Both kinds of gate speak it: a rollout's gates (`strata.control.gates`, `p95_latency_ratio<=1.5`, ordering
operators only, with an `on-no-data=` option after it) and the optimizer's accuracy gates (`strata.optimize.gate`,
`mean_cosine>=0.99,top1_agreement>=99%`, a comma list with `%` allowed). Each caller names the metrics it knows;
the grammar, the operators and the wording of a refusal are here.

A trailing `%` divides the number by 100, where allowed. NaN never satisfies a comparison; a threshold must be
finite.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

from strata.core.errors import ConfigError

OPERATORS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
ORDERING: Final = (">=", "<=", ">", "<")
"""The operators of a threshold on a measured figure (a rollout gate): every operator but `==`."""

NEGATION: Final = {">=": "<", "<=": ">", ">": "<=", "<": ">=", "==": "!="}

_COMPARISON = re.compile(
    r"\s*(?P<metric>[a-z][a-z0-9_]*)\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<percent>%?)\s*"
)


def compare(value: float, op: str, threshold: float) -> bool:
    """Whether `value OP threshold` holds; NaN never does.

    Raises:
        KeyError: `op` is not one of OPERATORS.
    """
    return not math.isnan(value) and OPERATORS[op](value, threshold)


@dataclass(frozen=True)
class Comparison:
    """One condition a measured value must meet: `metric op threshold`."""

    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return compare(value, self.op, self.threshold)

    def refusal(self, value: float) -> str:
        """Why `value` does not meet this condition, in its own terms (`mean_cosine 0.96 < 0.99`)."""
        return f"{self.metric} {value:.4g} {NEGATION[self.op]} {self.threshold:g}"

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_comparison(
    text: str, metrics: Collection[str], operators: Collection[str] = tuple(OPERATORS), percent: bool = False
) -> Comparison:
    """`mean_cosine >= 0.99` -> Comparison, for a metric among `metrics` and an operator among `operators` (`%`
    after the number when `percent`).

    Raises:
        ConfigError: not `METRIC OP NUMBER`, an operator or `%` not allowed here, an unknown metric, or a
            threshold that is not finite.
    """
    match = _COMPARISON.fullmatch(text)
    if match is None or match["op"] not in operators or (match["percent"] and not percent):
        number = "NUMBER[%]" if percent else "NUMBER"
        raise ConfigError(f"gate {text.strip()!r} is not METRIC OP {number} (OP one of {' '.join(operators)})")
    metric = match["metric"]
    if metric not in metrics:
        raise ConfigError(f"gate {text.strip()!r}: unknown metric {metric!r}; known: {', '.join(sorted(metrics))}")
    threshold = float(match["number"]) / (100.0 if match["percent"] else 1.0)
    if not math.isfinite(threshold):
        raise ConfigError(f"gate {text.strip()!r}: the threshold must be finite")
    return Comparison(metric, match["op"], threshold)
