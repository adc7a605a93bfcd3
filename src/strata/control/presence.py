"""When each node was last seen (and each operator token last used): kept in memory on every request, written to
the database in batches.

A node that polls every few seconds must not cost a database write each time; `flush` writes, in one
transaction, only the nodes whose time advanced since the last flush. The same tracker over `api_tokens.last_used_at`
records operator tokens.
"""

from __future__ import annotations

import threading

from sqlalchemy import bindparam, update
from sqlalchemy.orm import InstrumentedAttribute

from strata.control.db import Database, Node


class PresenceTracker:
    """Last-seen times by id (a node's, by default), with the set not yet written. Thread-safe."""

    def __init__(
        self,
        id_column: InstrumentedAttribute[str] = Node.id,
        time_column: InstrumentedAttribute[float | None] = Node.last_seen,
    ) -> None:
        self._id_column = id_column
        self._time_column = time_column
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._pending: dict[str, float] = {}

    def touch(self, node_id: str, now: float) -> None:
        """Record that `node_id` was seen at `now` (memory only)."""
        with self._lock:
            if now > self._seen.get(node_id, float("-inf")):
                self._seen[node_id] = now
                self._pending[node_id] = now

    def last_seen(self, node_id: str) -> float | None:
        """The latest time seen in this process, or None."""
        return self._seen.get(node_id)

    def forget(self, node_id: str) -> None:
        """Drop a node (revoked): nothing more is written for it."""
        with self._lock:
            self._seen.pop(node_id, None)
            self._pending.pop(node_id, None)

    def flush(self, db: Database) -> int:
        """Write the pending times in one transaction (never moving a stored time back); return how many.

        On failure the times stay pending for the next flush.

        Raises:
            StoreError: the database failed.
        """
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        column = self._time_column
        statement = (
            update(self._id_column.class_)
            .where(self._id_column == bindparam("node"))
            .where(column.is_(None) | (column < bindparam("seen")))
            .values({column.key: bindparam("seen")})
        )
        try:
            with db.transaction() as session:
                session.connection().execute(statement, [{"node": k, "seen": v} for k, v in batch.items()])
        except BaseException:
            with self._lock:
                for node_id, seen in batch.items():
                    if node_id in self._seen and seen > self._pending.get(node_id, float("-inf")):
                        self._pending[node_id] = seen
            raise
        return len(batch)
