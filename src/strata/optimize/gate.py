"""Accuracy gates: a tiny expression language (`mean_cosine>=0.99,min_cosine>=0.97`), parsed, never eval'd.

    gate   := clause ("," clause)*
    clause := METRIC OP NUMBER ["%"]
    OP     := ">=" | "<=" | ">" | "<" | "=="

METRIC is one of `METRICS`; a trailing `%` divides the number by 100 (`top1_agreement>=99%`). Judging a
variant against a gate is a pure function of its measured values.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from strata.core.errors import ConfigError

METRICS: Final = frozenset(
    {
        "top1_agreement",
        "accuracy",
        "mean_cosine",
        "min_cosine",
        "max_abs_error",
        "mean_abs_error",
        "rel_error",
        "speedup",
        "throughput",
        "latency_p50_ms",
        "latency_p95_ms",
        "size_bytes",
        "peak_memory_bytes",
    }
)
_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_NEGATION: Final = {">=": "<", "<=": ">", ">": "<=", "<": ">=", "==": "!="}
_CLAUSE = re.compile(
    r"\s*(?P<metric>[a-z][a-z0-9_]*)\s*(?P<op>>=|<=|==|>|<)\s*"
    r"(?P<number>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<percent>%?)\s*"
)
MAX_GATE_CHARS: Final = 1000


@dataclass(frozen=True)
class Clause:
    """One condition a measured value must meet."""

    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class Gate:
    """Conditions that all must hold for a variant to pass."""

    clauses: tuple[Clause, ...]

    def failures(self, values: Mapping[str, float | None]) -> list[str]:
        """Why `values` do not pass, one line per failed clause; empty when they pass."""
        reasons = []
        for clause in self.clauses:
            value = values.get(clause.metric)
            if value is None:
                reasons.append(f"{clause.metric} was not measured (gate {clause})")
            elif not clause.holds(value):
                reasons.append(f"{clause.metric} {value:.4g} {_NEGATION[clause.op]} {clause.threshold:g}")
        return reasons

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.clauses)


def parse_gate(text: str) -> Gate:
    """Parse a gate expression.

    Raises:
        ConfigError: empty, too long, a clause that does not follow the grammar, an unknown metric, or a
            metric named twice.
    """
    if len(text) > MAX_GATE_CHARS:
        raise ConfigError(f"gate expression is longer than {MAX_GATE_CHARS} characters")
    if not text.strip():
        raise ConfigError("gate expression is empty; write e.g. mean_cosine>=0.99,min_cosine>=0.97")
    clauses: list[Clause] = []
    for part in text.split(","):
        match = _CLAUSE.fullmatch(part)
        if match is None:
            raise ConfigError(f"gate clause {part.strip()!r} is not METRIC OP NUMBER (OP one of >= <= > < ==)")
        metric = match["metric"]
        if metric not in METRICS:
            raise ConfigError(f"gate names unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        if any(c.metric == metric for c in clauses):
            raise ConfigError(f"gate names {metric} twice")
        threshold = float(match["number"]) / (100.0 if match["percent"] else 1.0)
        clauses.append(Clause(metric, match["op"], threshold))
    return Gate(tuple(clauses))
