"""Which versions of a model ran where and when: activation events recorded from the nodes' status reports.

`activation_events(old, new)` is the pure part: the changes between a node's previous report and this one (a
version activated, a rollback to the previous slot, a model removed). The fleet service stores them in the same
transaction as the report; `HistoryService` answers `strata model history NAME`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from strata.control.db import ActivationEvent, Database, Model, Node
from strata.core.errors import NotFound
from strata.core.wire import NodeStatus


@dataclass(frozen=True)
class Change:
    """One change of what a node runs for one model."""

    model: str
    kind: str  # activated, rolled_back or removed
    version: str | None
    variant: str | None
    digest: str | None
    previous_version: str | None
    activated_at: float | None


def activation_events(old: NodeStatus | None, new: NodeStatus) -> list[Change]:
    """What changed between two reports of one node, model by model (a changed digest is a change)."""
    before = {m.name: m for m in old.models} if old is not None else {}
    after = {m.name: m for m in new.models}
    changes: list[Change] = []
    for name, model in sorted(after.items()):
        earlier = before.get(name)
        if earlier is not None and earlier.digest == model.digest:
            continue
        rolled_back = earlier is not None and earlier.previous_digest == model.digest
        changes.append(
            Change(
                model=name,
                kind="rolled_back" if rolled_back else "activated",
                version=model.version,
                variant=model.variant,
                digest=model.digest,
                previous_version=earlier.version if earlier is not None else None,
                activated_at=model.activated_at,
            )
        )
    for name, earlier in sorted(before.items()):
        if name not in after:
            changes.append(Change(name, "removed", None, None, None, earlier.version, None))
    return changes


def record_changes(node_id: str, changes: list[Change], at: float) -> list[ActivationEvent]:
    """The rows that store `changes` of node `node_id`, seen at `at` (the control plane's time)."""
    return [
        ActivationEvent(
            node_id=node_id,
            model=c.model,
            kind=c.kind,
            version=c.version,
            variant=c.variant,
            digest=c.digest,
            previous_version=c.previous_version,
            activated_at=c.activated_at,
            at=at,
        )
        for c in changes
    ]


@dataclass(frozen=True)
class HistoryEvent:
    """One change as `strata model history` shows it."""

    at: float
    node: str
    node_id: str
    kind: str
    version: str | None
    previous_version: str | None
    variant: str | None
    activated_at: float | None


class HistoryService:
    """Answers which versions of a model ran where and when."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def history(self, model: str, limit: int = 1000, node: str | None = None) -> list[HistoryEvent]:
        """The model's activation events, newest first (at most `limit`); only `node`'s (a name or id) when given.

        Raises:
            NotFound: no such model in the registry and no events about it; `node` names no node, live or revoked
                (a misspelt name would otherwise look like a node that never ran the model).
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            query = select(ActivationEvent, Node.name).join(Node, Node.id == ActivationEvent.node_id)
            if node is not None:
                known = session.scalar(select(Node.id).where((Node.id == node) | (Node.name == node)).limit(1))
                if known is None:
                    raise NotFound(f"no node {node!r} (live or revoked)")
                query = query.where((ActivationEvent.node_id == node) | (Node.name == node))
            rows = session.execute(
                query.where(ActivationEvent.model == model)
                .order_by(ActivationEvent.at.desc(), ActivationEvent.id.desc())
                .limit(limit)
            ).all()
            if not rows and session.scalar(select(Model.id).where(Model.name == model)) is None:
                raise NotFound(f"no model {model!r}")
            return [
                HistoryEvent(
                    at=event.at,
                    node=name,
                    node_id=event.node_id,
                    kind=event.kind,
                    version=event.version,
                    previous_version=event.previous_version,
                    variant=event.variant,
                    activated_at=event.activated_at,
                )
                for event, name in rows
            ]
