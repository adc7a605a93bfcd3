"""The gate expression language: what parses, what is refused, and how values are judged against it."""

from __future__ import annotations

import pytest

from strata.core.errors import ConfigError
from strata.optimize.gate import Clause, parse_gate


def test_parses_clauses_with_spaces_percent_and_exponents() -> None:
    gate = parse_gate(" mean_cosine >= 0.99 , min_cosine>=.97,top1_agreement>=99.5%, rel_error<1e-3 ")
    assert gate.clauses == (
        Clause("mean_cosine", ">=", 0.99),
        Clause("min_cosine", ">=", 0.97),
        Clause("top1_agreement", ">=", 0.995),
        Clause("rel_error", "<", 0.001),
    )
    assert str(gate) == "mean_cosine>=0.99,min_cosine>=0.97,top1_agreement>=0.995,rel_error<0.001"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("mean_cosine", "not METRIC OP NUMBER"),
        ("mean_cosine>=", "not METRIC OP NUMBER"),
        ("mean_cosine=>0.9", "not METRIC OP NUMBER"),
        ("mean_cosine>=0.9,", "not METRIC OP NUMBER"),
        ("mean_cosine>=abc", "not METRIC OP NUMBER"),
        ("mean_cosine>=0.9 and min_cosine>=0.9", "not METRIC OP NUMBER"),
        ("__import__('os').system('true')>=1", "not METRIC OP NUMBER"),
        ("cosine>=0.9", "unknown metric 'cosine'"),
        ("mean_cosine>=0.9,mean_cosine>=0.8", "twice"),
        ("mean_cosine>=0.9," * 100, "longer than"),
    ],
)
def test_refuses_what_is_not_the_grammar(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_gate(text)


def test_failures_name_the_metric_value_and_threshold() -> None:
    gate = parse_gate("mean_cosine>=0.99,min_cosine>=0.97")
    assert gate.failures({"mean_cosine": 0.995, "min_cosine": 0.98}) == []
    assert gate.failures({"mean_cosine": 0.96, "min_cosine": 0.98}) == ["mean_cosine 0.96 < 0.99"]
    assert gate.failures({"mean_cosine": 0.99, "min_cosine": None}) == [
        "min_cosine was not measured (gate min_cosine>=0.97)"
    ]


@pytest.mark.parametrize(
    ("op", "value", "holds"),
    [(">=", 1.0, True), (">", 1.0, False), ("<=", 1.0, True), ("<", 1.0, False), ("==", 1.0, True), (">=", 0.9, False)],
)
def test_operators(op: str, value: float, holds: bool) -> None:
    assert Clause("speedup", op, 1.0).holds(value) is holds


def test_nan_never_passes() -> None:
    assert parse_gate("rel_error<=1").failures({"rel_error": float("nan")}) == ["rel_error nan > 1"]
