"""The agent's in-memory log tail (`strata nodes logs`): the last lines as formatted, bounded in lines and bytes."""

from __future__ import annotations

import logging

from strata.agent.logtail import MAX_LINE_CHARS, LogTail


def _logger(tail: LogTail) -> logging.Logger:
    logger = logging.getLogger(f"test.logtail.{id(tail)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(tail)
    return logger


def test_the_tail_keeps_the_last_lines_as_formatted() -> None:
    tail = LogTail(max_lines=3)
    tail.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = _logger(tail)
    for i in range(5):
        logger.info("line %d", i)
    assert tail.tail(10) == "INFO line 2\nINFO line 3\nINFO line 4\n"
    assert tail.tail(1) == "INFO line 4\n"
    assert LogTail().tail(5) == ""


def test_the_tail_is_bounded_in_bytes_and_a_huge_record_is_cut() -> None:
    tail = LogTail(max_lines=1000, max_bytes=100)
    logger = _logger(tail)
    for i in range(20):
        logger.info("%02d-%s", i, "x" * 16)  # 20 bytes a line with its newline
    assert tail.tail(1000).splitlines() == [f"{i:02d}-{'x' * 16}" for i in range(15, 20)]
    logger.info("y" * (MAX_LINE_CHARS + 10))
    assert tail.tail(1) == "y" * MAX_LINE_CHARS + "\n"
