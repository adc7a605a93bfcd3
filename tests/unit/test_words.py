"""Counted nouns and durations in messages people read."""

from __future__ import annotations

import pytest

from strata.core.errors import ConfigError
from strata.core.words import MAX_MESSAGE_CHARS, clip, duration, parse_duration, plural, printable


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


def test_a_message_past_the_limit_is_cut_to_it_saying_how_long_it_was() -> None:
    assert clip("x" * MAX_MESSAGE_CHARS) == "x" * MAX_MESSAGE_CHARS
    cut = clip("unknown input '" + "\u00e9" * 100_000 + "'")
    assert len(cut) == MAX_MESSAGE_CHARS
    assert cut.startswith("unknown input '\u00e9")
    assert cut.endswith("... (100016 characters, cut)")
    assert clip("abcdef", 3).endswith("characters, cut)")  # a limit shorter than the note keeps only the note


def test_printable_writes_out_what_a_terminal_would_act_on_and_leaves_text_alone() -> None:
    assert printable("edge-1 [ok] é ü 東京 🙂") == "edge-1 [ok] é ü 東京 🙂"  # letters of any script are text
    assert printable("\x1b]0;owned\x07title") == "\\x1b]0;owned\\x07title"  # retitles a terminal window
    assert printable("ok\rFAILED\x1b[2K") == "ok\\rFAILED\\x1b[2K"  # rewrites the line shown
    assert printable("a\u202eb\u200bc\u2028d\x9b") == "a\\u202eb\\u200bc\\u2028d\\x9b"  # bidi, zero-width, CSI (C1)
    assert printable("one\ntwo\tthree\x00") == "one\\ntwo\\tthree\\x00"
    assert printable("one\ntwo\tthree\x00", keep="\n\t") == "one\ntwo\tthree\\x00"
