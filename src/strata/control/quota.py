"""Per-node budgets for what a node's own reports make the control plane store.

A node's status report is its word: each model it says it activated adds a row to the model history, and each
model and failure an event to the fleet's feed. A compromised node (it holds a valid certificate) could report a
different set in every call and grow those tables as fast as it can call. `RecordBudget` bounds that rate per
node: a token bucket (`capacity` records at once, refilled at `per_s`), in memory, per replica. An honest agent
reports a few changes an hour and never meets it.
"""

from __future__ import annotations

import threading
from typing import Final

# What one node's reports may record: a fleet-wide rollout of many models to one node fits at once; after that,
# a record a minute on average.
NODE_RECORDS: Final = 600
NODE_RECORDS_PER_S: Final = 1 / 60


class RecordBudget:
    """Token buckets by key (a node id). Thread-safe; `now` is passed in."""

    def __init__(self, capacity: float = NODE_RECORDS, per_s: float = NODE_RECORDS_PER_S) -> None:
        self._capacity = capacity
        self._per_s = per_s
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)

    def take(self, key: str, wanted: int, now: float) -> int:
        """Take up to `wanted` records from `key`'s bucket at `now`; return how many it may record."""
        if wanted <= 0:
            return 0
        with self._lock:
            tokens, at = self._buckets.get(key, (self._capacity, now))
            tokens = min(self._capacity, tokens + max(0.0, now - at) * self._per_s)
            granted = min(wanted, int(tokens))
            self._buckets[key] = (tokens - granted, now)
            return granted
