"""Words for people: counted nouns ('1 node', '3 nodes'), durations in the form the CLI and the simulator's
scenarios take them ('10m'), said and read back, times as a log says them, and error messages cut to a length any
client reads."""

from __future__ import annotations

import math
import time
from typing import Final

from strata.core.errors import ConfigError

# The units of a duration as `parse_duration` reads it and as `duration` says it.
DURATION_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# The longest error message an answer carries. A message may quote what a caller sent (a model, version or tensor
# name, up to a request's size): a gRPC status travels in a trailer a client refuses past 16 KiB, and a REST answer
# should not echo megabytes back to whoever sent them.
MAX_MESSAGE_CHARS: Final = 1024


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` if it is at most `limit` characters, else its start cut to fit with how long it was, so that any
    client reads it and nobody gets their own megabytes back."""
    if len(message) <= limit:
        return message
    tail = f"... ({len(message)} characters, cut)"
    return message[: max(0, limit - len(tail))] + tail


# Characters that do something to a terminal or to how text reads instead of showing (controls, the escape sequences'
# ESC, bidirectional overrides, zero-width and line/paragraph separators): Unicode's Cc, Cf, Zl and Zp.
HIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp"})


def printable(text: str, keep: str = "") -> str:
    """`text` with each hidden character (`HIDDEN_CATEGORIES`) but those in `keep` written out as Python would in a
    string literal (ESC as `\\x1b`, a right-to-left override as `\\u202e`), so that text a node or a caller chose
    shows as what it is on an operator's terminal instead of moving its cursor, retitling its window, or turning the
    order of what follows around."""
    if text.isprintable() and text.isascii():  # the common case: nothing to look at
        return text
    import unicodedata  # here: the agent imports this module, and rarely needs its 0.3 MB of tables

    return "".join(
        char if char in keep or unicodedata.category(char) not in HIDDEN_CATEGORIES else ascii(char)[1:-1]
        for char in text
    )


def plural(count: int, noun: str) -> str:
    """'1 node', '3 nodes', '0 nodes'."""
    return f"{count} {noun}" + ("" if count == 1 else "s")


def utc_time(seconds: float) -> str:
    """A Unix time as people read it in a log: `2026-12-05 23:23:06 UTC`."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def duration(seconds: float) -> str:
    """'1h', '10m', '90s', '1.5s': the largest unit that counts `seconds` whole, as `--bake 10m` or `--timeout 2h`
    take it (`parse_duration` reads it back)."""
    for unit in ("d", "h", "m"):
        size = DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h', '7d' -> seconds: how the CLI's options and the simulator's scenarios take a
    duration. A negative one is read (the caller says what it may be); NaN and infinity are not durations.

    Raises:
        ConfigError: not a duration.
    """
    text = text.strip().lower()
    try:
        seconds = float(text[:-1]) * DURATION_UNITS[text[-1]] if text and text[-1] in DURATION_UNITS else float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ConfigError(f"{text!r} is not a duration (use 90s, 10m, 2h, 7d)")
    return seconds


def parse_retention(text: str, option: str, minimum_s: float) -> float:
    """A retention option's value ('90d', '36h') in seconds, at least `minimum_s`; errors name `option`.

    Raises:
        ConfigError: not a duration, or under the minimum.
    """
    try:
        seconds = parse_duration(text)
    except ConfigError as exc:
        raise ConfigError(f"{option}: {exc}") from exc
    if seconds < minimum_s:
        raise ConfigError(f"{option} must be at least {duration(minimum_s)}, got {text!r}")
    return seconds
