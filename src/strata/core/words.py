"""Words for people: counted nouns ('1 node', '3 nodes') and durations in the form the CLI takes them ('10m')."""

from __future__ import annotations

from typing import Final

# The units of a duration as the CLI takes it (`strata.cli.common.parse_duration`) and as `duration` says it.
DURATION_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def plural(count: int, noun: str) -> str:
    """'1 node', '3 nodes', '0 nodes'."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def duration(seconds: float) -> str:
    """'1h', '10m', '90s', '1.5s': the largest unit that counts `seconds` whole, as `--bake 10m` or `--timeout 2h`
    take it (`strata.cli.common.parse_duration` reads it back)."""
    for unit in ("d", "h", "m"):
        size = DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
