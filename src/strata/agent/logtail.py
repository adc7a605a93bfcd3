"""The agent's last log lines, kept in memory for `strata nodes logs`: the agent logs to stderr only, and the
control plane cannot reach a node, so the node uploads this tail when its desired state asks for it."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Final

from strata.core.wire import MAX_LOG_LINES

MAX_TAIL_BYTES: Final = 1024 * 1024  # the control plane accepts a little more (`control.nodelogs`)
MAX_LINE_CHARS: Final = 8192  # a longer record (a traceback) keeps its first 8192 characters


class LogTail(logging.Handler):
    """A logging handler that keeps the last `max_lines` formatted records, at most `max_bytes` of them."""

    def __init__(self, max_lines: int = MAX_LOG_LINES, max_bytes: int = MAX_TAIL_BYTES) -> None:
        super().__init__()
        self._lines: collections.deque[str] = collections.deque()
        self._bytes = 0
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)[:MAX_LINE_CHARS]
        except Exception:
            return
        size = len(line.encode("utf-8", errors="replace")) + 1
        with self._guard:
            self._lines.append(line)
            self._bytes += size
            while len(self._lines) > self._max_lines or (self._bytes > self._max_bytes and len(self._lines) > 1):
                self._bytes -= len(self._lines.popleft().encode("utf-8", errors="replace")) + 1
        # A single line over `max_bytes` cannot happen: MAX_LINE_CHARS * 4 bytes is far below it.

    def tail(self, lines: int) -> str:
        """The last `lines` lines, oldest first, each ending in a newline."""
        with self._guard:
            kept = list(self._lines)[-lines:] if lines > 0 else []
        return "".join(line + "\n" for line in kept)
