"""How long ago a wall-clock date was, measured on the monotonic clock: waits that outlive a wall clock's steps.

The agent dates what it records and sends (a failure's `at`, a probation's `started_at`) on the wall clock, and must
keep doing so: those dates reach state.json and the control plane. But the wall clock steps (NTP correcting a node
that booted a day fast, an operator's `date -s`, an RTC that lost its battery), and a wait measured on it ends at
once or lasts until the clock catches up. So the wall clock is asked how old a date is only the first time the agent
sees it (what a record read from state.json at start-up has: negative ages count as zero), and from then on the
monotonic clock counts on from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Hashable


class Elapsed:
    """Seconds since wall-clock dates, each read from the wall clock once and from the monotonic clock after."""

    def __init__(self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self.monotonic = monotonic
        self._anchors: dict[Hashable, tuple[float, float]] = {}  # key -> (the date, the monotonic time it was)

    def since(self, key: Hashable, at: float) -> float:
        """Seconds since `at` (a wall-clock date) for the record `key`; a new date for the key starts it afresh."""
        now = self.monotonic()
        anchor = self._anchors.get(key)
        if anchor is None or anchor[0] != at:
            anchor = (at, now - max(0.0, self.wall() - at))
            self._anchors[key] = anchor
        return now - anchor[1]

    def keep(self, keys: Collection[Hashable]) -> None:
        """Forget the dates of every record but `keys` (those that are gone)."""
        for key in self._anchors.keys() - set(keys):
            del self._anchors[key]
