"""Counted nouns and durations in messages people read."""

from __future__ import annotations

import pytest

from strata.core.errors import ConfigError
from strata.core.words import duration, parse_duration, plural


def test_a_count_of_one_takes_the_singular() -> None:
    assert [plural(n, "active package") for n in (0, 1, 2)] == [
        "0 active packages",
        "1 active package",
        "2 active packages",
    ]


@pytest.mark.parametrize(
    ("seconds", "said"),
    [(3600, "1h"), (600, "10m"), (90, "90s"), (5400, "90m"), (86400, "1d"), (0.5, "0.5s"), (0, "0s"), (7200.0, "2h")],
)
def test_durations_are_said_the_way_the_cli_takes_them(seconds: float, said: str) -> None:
    assert duration(seconds) == said
    assert parse_duration(said) == seconds


@pytest.mark.parametrize("text", ["", "soon", "10x", "inf", "nan", "-infs", "1e400", "9e307d"])
def test_what_is_not_a_finite_number_of_seconds_is_not_a_duration(text: str) -> None:
    with pytest.raises(ConfigError, match="is not a duration"):
        parse_duration(text)
