"""`--telemetry-retention`: a duration of at least an hour; `--event-retention`: one of at least a day."""

from __future__ import annotations

import pytest

from strata.control.events import event_retention_seconds
from strata.control.telemetry import retention_seconds
from strata.core.errors import ConfigError


@pytest.mark.parametrize(("text", "seconds"), [("90d", 90 * 86400.0), ("1h", 3600.0), ("36h", 36 * 3600.0)])
def test_a_retention_is_read_as_a_duration(text: str, seconds: float) -> None:
    assert retention_seconds(text) == seconds


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("59m", "--telemetry-retention must be at least 1h, got '59m'"),
        ("0", "--telemetry-retention must be at least 1h, got '0'"),
        ("-90d", "--telemetry-retention must be at least 1h, got '-90d'"),
        ("nan", "--telemetry-retention: 'nan' is not a duration (use 90s, 10m, 2h, 7d)"),
        ("infd", "--telemetry-retention: 'infd' is not a duration (use 90s, 10m, 2h, 7d)"),
        ("forever", "--telemetry-retention: 'forever' is not a duration (use 90s, 10m, 2h, 7d)"),
    ],
)
def test_a_retention_under_an_hour_or_not_finite_is_refused(text: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        retention_seconds(text)
    assert str(refused.value) == said


@pytest.mark.parametrize(("text", "seconds"), [("365d", 365 * 86400.0), ("1d", 86400.0), ("48h", 48 * 3600.0)])
def test_an_event_retention_is_read_as_a_duration(text: str, seconds: float) -> None:
    assert event_retention_seconds(text) == seconds


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("23h", "--event-retention must be at least 1d, got '23h'"),
        ("-1d", "--event-retention must be at least 1d, got '-1d'"),
        ("infd", "--event-retention: 'infd' is not a duration (use 90s, 10m, 2h, 7d)"),
    ],
)
def test_an_event_retention_under_a_day_or_not_finite_is_refused(text: str, said: str) -> None:
    with pytest.raises(ConfigError) as refused:
        event_retention_seconds(text)
    assert str(refused.value) == said
