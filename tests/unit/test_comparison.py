"""The one gate language: what a comparison parses to, what it refuses (in the same words for rollout gates and
accuracy gates), and how a value is judged against it."""

from __future__ import annotations

import math

import pytest

from strata.control.gates import parse_gate as parse_rollout_gate
from strata.core.comparison import OPERATORS, ORDERING, Comparison, compare, parse_comparison
from strata.core.errors import ConfigError
from strata.optimize.gate import parse_gate as parse_accuracy_gate

METRICS = frozenset({"speedup", "error_rate"})


def test_parses_spaces_exponents_and_percent_where_allowed() -> None:
    assert parse_comparison(" speedup >= 1.5 ", METRICS) == Comparison("speedup", ">=", 1.5)
    assert parse_comparison("error_rate<1e-3", METRICS) == Comparison("error_rate", "<", 0.001)
    assert parse_comparison("error_rate<=.5%", METRICS, percent=True) == Comparison("error_rate", "<=", 0.005)
    assert str(Comparison("speedup", "==", 2.0)) == "speedup==2"


@pytest.mark.parametrize(
    ("text", "operators", "message"),
    [
        ("speedup", tuple(OPERATORS), "is not METRIC OP NUMBER"),
        ("speedup=>1", tuple(OPERATORS), "is not METRIC OP NUMBER"),
        ("speedup>=nan", tuple(OPERATORS), "is not METRIC OP NUMBER"),
        ("speedup>=1 and error_rate<1", tuple(OPERATORS), "is not METRIC OP NUMBER"),
        ("speedup>=1%", tuple(OPERATORS), "is not METRIC OP NUMBER"),  # no `%` unless the caller allows it
        ("speedup==1", ORDERING, r"is not METRIC OP NUMBER \(OP one of >= <= > <\)"),
        ("happiness>=1", tuple(OPERATORS), "unknown metric 'happiness'; known: error_rate, speedup"),
        ("speedup>=1e999", tuple(OPERATORS), "the threshold must be finite"),
    ],
)
def test_refuses_with_one_wording(text: str, operators: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_comparison(text, METRICS, operators)


def test_both_gates_refuse_in_the_words_of_the_language() -> None:
    for parse, text in ((parse_rollout_gate, "p95_latency_ratio=>2"), (parse_accuracy_gate, "mean_cosine=>0.9")):
        with pytest.raises(ConfigError, match=f"gate '{text}' is not METRIC OP NUMBER"):
            parse(text)
    for parse, text in ((parse_rollout_gate, "latency<=2"), (parse_accuracy_gate, "cosine>=0.9")):
        with pytest.raises(ConfigError, match=f"gate '{text}': unknown metric"):
            parse(text)
    with pytest.raises(ConfigError, match="OP one of >= <= > <\\)"):
        parse_rollout_gate("p95_latency_ratio==1")  # a rollout gate is a threshold: no `==`


@pytest.mark.parametrize(
    ("op", "value", "holds"),
    [(">=", 1.0, True), (">", 1.0, False), ("<=", 1.0, True), ("<", 1.0, False), ("==", 1.0, True), ("<", 0.9, True)],
)
def test_operators_and_nan(op: str, value: float, holds: bool) -> None:
    assert compare(value, op, 1.0) is holds
    assert compare(math.nan, op, 1.0) is False


def test_a_refusal_says_the_value_and_the_negated_operator() -> None:
    assert Comparison("speedup", ">=", 1.5).refusal(1.25) == "speedup 1.25 < 1.5"
    assert Comparison("error_rate", "==", 0.0).refusal(0.5) == "error_rate 0.5 != 0"
