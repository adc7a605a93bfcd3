"""Log lines for machines (`--log-format json`): one JSON object per line, for the server, the agent and the gateway.

Every object has `time` (ISO 8601, UTC, milliseconds), `level`, `logger` and `message`, then the fields the process
adds to every line (the agent: `node`), and `exception` when a traceback was logged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Final

from strata.core.errors import ConfigError

LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def check_log_level(value: str) -> int:
    """The `logging` level of a `--log-level` value.

    Raises:
        ConfigError: it is not debug, info, warning or error (in any case).
    """
    if value.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    level: int = getattr(logging, value.upper())
    return level


def check_log_format(value: str) -> str:
    """`value` if it is a log format strata writes.

    Raises:
        ConfigError: it is not `text` or `json`.
    """
    if value not in LOG_FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
    return value


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of JSON; `fields` are added to every line."""

    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.fields,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class Quieted:
    """Whether a warning that repeats is due again: once per `interval_s` for each kind. A flood (refused
    connections, accept failing for want of descriptors) would otherwise log it for every event. Pure: the caller
    passes `now` (its monotonic clock) and holds its own lock where threads share one."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def due(self, kind: str, now: float) -> bool:
        """True the first time `kind` is asked for and once `interval_s` has passed since it last was."""
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[kind] = now
        return True
