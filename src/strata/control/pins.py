"""Pins: an operator keeps one node, or the nodes a selector matches, on a version of a model.

A pin beats every deployment and rollout of its model on those nodes (see `strata.control.desired`); a rollout
leaves pinned nodes out and says so. Creating or deleting one bumps the fleet generation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, selectinload

from strata.control.db import Database, ModelVersion, Node, Pin, runnable_version
from strata.control.feed import ChangeFeed
from strata.core.errors import NotFound
from strata.core.wire import ProtocolError, parse_labels, selector_matches


@dataclass(frozen=True)
class PinInfo:
    """A pin as the API shows it, with how many live nodes it holds now."""

    id: str
    model: str
    version: str
    node: str | None
    node_id: str | None
    selector: dict[str, str]
    created_at: float
    matched_nodes: int


def _live_nodes(session: Session) -> list[tuple[str, str, dict[str, str]]]:
    return [
        (r.id, r.name, r.labels)
        for r in session.execute(select(Node.id, Node.name, Node.labels).where(Node.revoked_at.is_(None)))
    ]


def _pin_info(row: Pin, live: list[tuple[str, str, dict[str, str]]]) -> PinInfo:
    if row.node_id is not None:
        names = [name for node_id, name, _ in live if node_id == row.node_id]
        node, matched = (names[0] if names else row.node_id), len(names)
    else:
        node, matched = None, sum(1 for _, _, labels in live if selector_matches(row.selector, labels))
    return PinInfo(
        id=str(row.id),
        model=row.version.model.name,
        version=row.version.version,
        node=node,
        node_id=row.node_id,
        selector=dict(row.selector),
        created_at=row.created_at,
        matched_nodes=matched,
    )


class PinService:
    """Creates, lists and deletes pins."""

    def __init__(self, db: Database, feed: ChangeFeed, clock: Callable[[], float]) -> None:
        self._db = db
        self._feed = feed
        self._clock = clock

    def create(self, model: str, version: str, node: str | None, selector: Mapping[str, str]) -> PinInfo:
        """Pin `model` at `version` on one node (by name or id) or on the nodes `selector` matches.

        Raises:
            ProtocolError: neither or both of a node and a selector, or a malformed selector.
            NotFound: no such model, version or node.
            StoreError: the database failed.
        """
        selector = parse_labels(dict(selector), "selector")
        if (node is None) == (not selector):
            raise ProtocolError("a pin names one node or a non-empty label selector, not both and not neither")
        with self._db.transaction() as session:
            row = runnable_version(session, model, version, "run")
            node_id = None
            if node is not None:
                node_id = session.scalar(
                    select(Node.id).where(or_(Node.name == node, Node.id == node), Node.revoked_at.is_(None))
                )
                if node_id is None:
                    raise NotFound(f"no node {node!r}")
            pin = Pin(version=row, node_id=node_id, selector=selector, created_at=self._clock())
            session.add(pin)
            session.flush()
            info = _pin_info(pin, _live_nodes(session))
        self._feed.bump()
        return info

    def list(self) -> list[PinInfo]:
        """Every pin, newest first.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.scalars(
                select(Pin).options(selectinload(Pin.version).selectinload(ModelVersion.model)).order_by(Pin.id.desc())
            ).all()
            live = _live_nodes(session)
            return [_pin_info(row, live) for row in rows]

    def delete(self, pin_id: str) -> None:
        """Remove a pin; its nodes follow deployments and rollouts again.

        Raises:
            NotFound: no such pin.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            row = session.get(Pin, int(pin_id)) if pin_id.isdecimal() else None
            if row is None:
                raise NotFound(f"no pin {pin_id!r}")
            session.delete(row)
        self._feed.bump()
