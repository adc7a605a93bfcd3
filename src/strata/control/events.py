"""The fleet's event feed: what happened, when, to which node, model and rollout (`GET /v1/events`, `strata events`).

Retention (`EventService.sweep`): events older than `--event-retention` (default a year) are deleted by the replica
that holds the rollout lease, with the telemetry sweep, in short chunks; without it the feed grows for as long as the
fleet lives (every activation, rollback and failure of every node). Ids are never reused, so a follower's cursor
stays valid across a sweep.

Each service records its events in the same transaction as the change itself (`record_event`), so the feed never
shows a change that was rolled back, nor misses one that was stored. The pure parts say which events a change
makes: `failure_events` (a node's new failures between two reports) and `rollout_events` (a rollout's step: its
status, a wave's gates passed or failed, a node it found failed). Ids only grow: they are the feed's cursor.
"""

from __future__ import annotations

import builtins
import functools
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from strata.control.db import SWEEP_CHUNK, SWEEP_PAUSE_S, Database, FleetEvent, Node, RolloutNode, in_chunks
from strata.control.history import Change
from strata.control.rollout_plan import RolloutState
from strata.core.errors import NotFound
from strata.core.wire import NodeStatus, ProtocolError
from strata.core.words import parse_retention

EVENT_KINDS: Final = (
    "enrolled",
    "revoked",
    "activated",
    "rolled_back",
    "removed",
    "failed",
    "deployed",
    "undeployed",
    "rollout",
    "gate",
)
MAX_EVENTS: Final = 5000
MIN_EVENT_RETENTION_S: Final = 86400.0
# What a rollout's nodes do with its model that belongs on the rollout's timeline.
NODE_KINDS_OF_ROLLOUT: Final = ("activated", "rolled_back", "removed", "failed")


@dataclass(frozen=True)
class Event:
    """One event of the feed, as the API shows it (`node` is the node's name)."""

    id: int
    at: float
    kind: str
    node: str | None
    node_id: str | None
    model: str | None
    version: str | None
    rollout: str | None
    message: str


@dataclass(frozen=True)
class NewEvent:
    """An event to record, before it has an id and a time."""

    kind: str
    message: str
    node_id: str | None = None
    model: str | None = None
    version: str | None = None
    rollout_id: int | None = None


def record_event(session: Session, at: float, event: NewEvent) -> None:
    """Add `event` to the feed, in `session`'s transaction (it is stored with the change it describes)."""
    session.add(
        FleetEvent(
            at=at,
            kind=event.kind,
            node_id=event.node_id,
            model=event.model,
            version=event.version,
            rollout_id=event.rollout_id,
            message=event.message[:2000],
        )
    )


def failure_events(node_id: str, old: NodeStatus | None, new: NodeStatus) -> list[NewEvent]:
    """The failures `new` reports that `old` did not (a retry failing the same way again is not a new one)."""
    seen = {(f.model, f.version, f.reason) for f in old.failures} if old is not None else set()
    return [
        NewEvent(
            "failed",
            f"{f.model} {f.version} failed ({f.kind}): {f.reason}",
            node_id=node_id,
            model=f.model,
            version=f.version,
        )
        for f in new.failures
        if (f.model, f.version, f.reason) not in seen
    ]


def change_events(node_id: str, changes: Iterable[Change]) -> list[NewEvent]:
    """The feed's entries for a node's changes of what it runs (see `history.activation_events`)."""
    words = {"activated": "activated", "rolled_back": "rolled back to", "removed": "removed"}
    events = []
    for change in changes:
        version = change.version if change.kind != "removed" else change.previous_version
        was = f" (was {change.previous_version})" if change.previous_version and change.kind != "removed" else ""
        variant = f" {change.variant}" if change.variant else ""
        message = f"{change.model}: {words.get(change.kind, change.kind)} {version}{variant}{was}"
        events.append(NewEvent(change.kind, message, node_id=node_id, model=change.model, version=version))
    return events


def _gates(state: RolloutState, wave: int) -> str:
    results = [g for g in state.gate_results if g.wave == wave]
    return "; ".join(f"{g.gate.text}: {'-' if g.value is None else f'{g.value:.4g}'} {g.verdict}" for g in results)


def rollout_events(old: RolloutState, new: RolloutState) -> list[NewEvent]:
    """What one step of a rollout (`old` -> `new`) adds to the feed: a wave whose gates passed, a gate that failed,
    nodes it marked failed, and a change of its status."""

    def event(kind: str, message: str, node_id: str | None = None) -> NewEvent:
        return NewEvent(kind, message, node_id, new.model, new.version, new.id)

    events: list[NewEvent] = []
    for node_id, assignment in new.nodes.items():
        before = old.nodes.get(node_id)
        if assignment.failed_at is not None and (before is None or before.failed_at is None):
            events.append(event("failed", f"rollout {new.id}: {assignment.failure or 'failed'}", node_id))
    if new.failed_gate is not None and new.failed_gate != old.failed_gate:
        gate = new.failed_gate
        events.append(event("gate", f"gate {gate.gate.text} failed in wave {gate.wave + 1}: {gate.detail}"))
    completed = new.status == "succeeded" and old.status != "succeeded"
    passed = old.wave
    # a wave without nodes is walked past, not judged (its gates had nothing to judge): nothing passed there. Its
    # members after the step: ones kept out during it (a pin) left it as empty as one that never had any
    if (new.wave > old.wave or completed) and new.members(passed):
        numbers = _gates(new, passed) or _gates(old, passed)
        events.append(event("gate", f"wave {passed + 1} passed its gates" + (f": {numbers}" if numbers else "")))
    if new.status != old.status:
        events.append(event("rollout", f"rollout {new.id}: {new.status} ({new.message})"))
    return events


def event_retention_seconds(text: str) -> float:
    """`--event-retention` ('365d', '90d', ...) in seconds: at least a day, and finite.

    Raises:
        ConfigError: not a duration, not finite, or under a day.
    """
    return parse_retention(text, "--event-retention", MIN_EVENT_RETENTION_S)


class EventService:
    """Answers `GET /v1/events`; deletes events past their retention (`sweep`)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self.expired = 0  # events this replica deleted as older than the retention (for /metrics)
        self._lock = threading.Lock()

    def sweep(
        self,
        retention_s: float,
        chunk: int = SWEEP_CHUNK,
        pause_s: float = SWEEP_PAUSE_S,
        stop: threading.Event | None = None,
    ) -> int:
        """Delete the events older than `retention_s` (before `now - retention_s` on the server's clock), `chunk`
        per statement and transaction; return how many (also added to `expired`). Idempotent: two replicas
        sweeping at once only delete fewer each. Once `stop` is set, no further chunk starts.

        Raises:
            StoreError: the database failed (what was deleted before stays deleted; the next sweep goes on).
        """
        cutoff = self._clock() - retention_s
        step = functools.partial(self._db.delete_chunk, FleetEvent, FleetEvent.at < cutoff, chunk)
        return in_chunks(step, chunk, pause_s, stop, self._count_expired)

    def _count_expired(self, count: int) -> None:
        with self._lock:
            self.expired += count

    def list(
        self,
        since: float | None = None,
        after: int | None = None,
        kinds: Collection[str] = (),
        node: str | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        """Events oldest first: those after id `after` (the first `limit` of them: the way to follow the feed), or
        else the last `limit` at or after time `since`; only of `kinds` and of `node` (a name or id) when given.

        Raises:
            ProtocolError: an unknown kind, or a limit out of 1..MAX_EVENTS.
            NotFound: `node` names no node, live or revoked (a node with no events gives an empty list).
            StoreError: the database failed.
        """
        unknown = sorted(set(kinds) - set(EVENT_KINDS))
        if unknown:
            raise ProtocolError(f"unknown event kind {', '.join(unknown)}: one of {', '.join(EVENT_KINDS)}")
        if not 1 <= limit <= MAX_EVENTS:
            raise ProtocolError(f"limit must be between 1 and {MAX_EVENTS}")
        if node is not None:
            with self._db.transaction() as session:
                known = session.scalar(select(Node.id).where((Node.id == node) | (Node.name == node)).limit(1))
            if known is None:  # a misspelt name would otherwise look like a node to which nothing happened
                raise NotFound(f"no node {node!r} (live or revoked)")
        query = select(FleetEvent, Node.name).outerjoin(Node, Node.id == FleetEvent.node_id)
        if kinds:
            query = query.where(FleetEvent.kind.in_(list(kinds)))
        if node is not None:
            query = query.where((FleetEvent.node_id == node) | (Node.name == node))
        if since is not None:
            query = query.where(FleetEvent.at >= since)
        if after is not None:
            query = query.where(FleetEvent.id > after).order_by(FleetEvent.id).limit(limit)
        else:
            query = query.order_by(FleetEvent.id.desc()).limit(limit)
        return _fetch(self._db, query, oldest_first=after is not None)

    def of_rollout(
        self, rollout_id: int, model: str, start: float, end: float | None, limit: int
    ) -> builtins.list[Event]:  # `list` here is the method above
        """A rollout's timeline, oldest first (the last `limit` events): its own events (its status, its gates,
        the nodes it found failed) and what its nodes (those it did not keep out) did with its model between
        `start` and `end` (None: until now): activations, rollbacks, removals and failures they reported.

        The time window keeps the query on the `at` index, so a long feed costs only the rollout's own stretch.

        Raises:
            StoreError: the database failed.
        """
        its_nodes = select(RolloutNode.node_id).where(
            RolloutNode.rollout_id == rollout_id, RolloutNode.excluded.is_(None)
        )
        window = FleetEvent.at >= start if end is None else FleetEvent.at.between(start, end)
        query = (
            select(FleetEvent, Node.name)
            .outerjoin(Node, Node.id == FleetEvent.node_id)
            .where(window)
            .where(
                (FleetEvent.rollout_id == rollout_id)
                | (
                    (FleetEvent.model == model)
                    & FleetEvent.kind.in_(NODE_KINDS_OF_ROLLOUT)
                    & FleetEvent.node_id.in_(its_nodes)
                )
            )
            .order_by(FleetEvent.id.desc())
            .limit(limit)
        )
        return _fetch(self._db, query, oldest_first=False)


def _fetch(db: Database, query: Select[FleetEvent, str], *, oldest_first: bool) -> list[Event]:
    """Run an events query (rows of an event and its node's name), in its order or reversed."""
    with db.transaction() as session:
        rows = session.execute(query).all()
    events = [
        Event(
            id=row.id,
            at=row.at,
            kind=row.kind,
            node=name,
            node_id=row.node_id,
            model=row.model,
            version=row.version,
            rollout=str(row.rollout_id) if row.rollout_id is not None else None,
            message=row.message,
        )
        for row, name in rows
    ]
    return events if oldest_first else events[::-1]
