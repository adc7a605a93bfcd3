"""When each node was last seen: kept in memory on every request, written to the database in batches.

A node that polls every few seconds must not cost a database write each time; `flush` writes, in one
transaction, only the nodes whose time advanced since the last flush.
"""

from __future__ import annotations

import threading

from sqlalchemy import bindparam, update

from strata.control.db import Database, Node


class PresenceTracker:
    """Last-seen times by node id, with the set not yet written. Thread-safe."""

    def __init__(self) -> None:
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
        statement = (
            update(Node)
            .where(Node.id == bindparam("node"))
            .where((Node.last_seen.is_(None)) | (Node.last_seen < bindparam("seen")))
            .values(last_seen=bindparam("seen"))
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
