"""Accuracy gates: a tiny expression language (`mean_cosine>=0.99,min_cosine>=0.97`), parsed, never eval'd.

    gate   := clause ("," clause)*
    clause := METRIC OP NUMBER ["%"]
    OP     := ">=" | "<=" | ">" | "<" | "=="

METRIC is one of `METRICS`; a trailing `%` divides the number by 100 (`top1_agreement>=99%`). A clause is a
comparison of the gate language (`strata.core.comparison`), which rollout gates speak too. Judging a variant
against a gate is a pure function of its measured values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from strata.core.comparison import Comparison, parse_comparison
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
MAX_GATE_CHARS: Final = 1000


Clause = Comparison
"""One condition of a gate (the gate language's comparison)."""


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
                reasons.append(clause.refusal(value))
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
        clause = parse_comparison(part, METRICS, percent=True)
        if any(c.metric == clause.metric for c in clauses):
            raise ConfigError(f"gate names {clause.metric} twice")
        clauses.append(clause)
    return Gate(tuple(clauses))
