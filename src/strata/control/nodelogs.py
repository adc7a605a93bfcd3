"""Logs fetched from a node on demand (`strata nodes logs NODE`).

The control plane cannot connect to a node (nodes sit behind NAT and only poll it), so an operator's ask is
stored and rides in the node's desired state (`LogRequest`): storing it bumps the change feed, which wakes the
node's long poll; the node uploads the tail of its own log to the request; the operator's CLI polls the request
until it is answered. Answering (or a newer ask) bumps the feed again, and the request leaves the desired state.

Only the newest `KEEP_PER_NODE` requests of a node are kept; a node has at most one open request in its desired
state (the newest), and its answer also answers the older open ones, so an operator who asked twice is not left
waiting.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from strata.control.db import Database, Node, NodeLogRequest
from strata.control.feed import ChangeFeed
from strata.core.errors import NotFound
from strata.core.wire import MAX_LOG_LINES, LogRequest, ProtocolError

KEEP_PER_NODE: Final = 5
# What a node may upload for one request: its ring buffer holds at most 1 MiB of formatted lines (see
# `agent.logtail`); a little more for the JSON around them.
MAX_ANSWER_BYTES: Final = 1024 * 1024 + 64 * 1024


def open_log_requests(session: Session) -> dict[str, LogRequest]:
    """Per node, its newest unanswered log request (what its desired state carries)."""
    rows = session.execute(
        select(NodeLogRequest.id, NodeLogRequest.node_id, NodeLogRequest.lines)
        .where(NodeLogRequest.answered_at.is_(None))
        .order_by(NodeLogRequest.seq)
    ).all()
    return {row.node_id: LogRequest(row.id, row.lines) for row in rows}  # the newest wins


def _request(session: Session, node_id: str, request_id: str) -> NodeLogRequest:
    """Request `request_id` of node `node_id`.

    Raises:
        NotFound: none (another node's request reads as none).
    """
    row = session.scalar(select(NodeLogRequest).where(NodeLogRequest.id == request_id))
    if row is None or row.node_id != node_id:
        raise NotFound(f"node {node_id!r} has no log request {request_id!r}")
    return row


def _view(row: NodeLogRequest) -> dict[str, Any]:
    return {
        "id": row.id,
        "node_id": row.node_id,
        "lines": row.lines,
        "created_at": row.created_at,
        "answered_at": row.answered_at,
        "state": "pending" if row.answered_at is None else "answered",
        "text": row.text,
    }


# Control characters but tab and newline: a node's log is its own claim, printed in an operator's terminal, where
# escape sequences could move the cursor, forge lines or (OSC 52) write the clipboard; NUL is also refused by
# PostgreSQL's text columns.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character but tab and newline replaced by U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


class NodeLogService:
    """Asks for node logs, the nodes' answers, and reading them back."""

    def __init__(self, db: Database, feed: ChangeFeed, clock: Callable[[], float]) -> None:
        self._db = db
        self._feed = feed
        self._clock = clock

    def ask(self, node_id: str, lines: int) -> dict[str, Any]:
        """Ask node `node_id` for its last `lines` log lines; the new request (pending).

        Raises:
            NotFound: no such node, or it was revoked.
            ProtocolError: `lines` is out of range.
            StoreError: the database failed.
        """
        if not 1 <= lines <= MAX_LOG_LINES:
            raise ProtocolError(f"lines must be between 1 and {MAX_LOG_LINES}")
        with self._db.transaction() as session:
            node = session.get(Node, node_id)
            if node is None or node.revoked_at is not None:
                raise NotFound(f"no node {node_id!r}")
            row = NodeLogRequest(
                id=secrets.token_hex(16), node_id=node_id, lines=lines, created_at=self._clock(), answered_at=None
            )
            session.add(row)
            session.flush()
            keep = select(NodeLogRequest.seq).where(NodeLogRequest.node_id == node_id)
            kept = list(session.scalars(keep.order_by(NodeLogRequest.seq.desc()).limit(KEEP_PER_NODE)))
            session.execute(
                delete(NodeLogRequest).where(NodeLogRequest.node_id == node_id, NodeLogRequest.seq.not_in(kept))
            )
            view = _view(row)
        self._feed.bump()  # wakes the node's long poll
        return view

    def answer(self, node_id: str, request_id: str, text: str) -> None:
        """Store node `node_id`'s log tail for its request `request_id` (and its older open ones). A request
        answered already keeps its first answer.

        Raises:
            NotFound: the node has no such request (another node's request reads as none).
            StoreError: the database failed.
        """
        text = printable(text)
        with self._db.transaction() as session:
            row = _request(session, node_id, request_id)
            if row.answered_at is not None:
                return
            now = self._clock()
            older = session.scalars(
                select(NodeLogRequest).where(
                    NodeLogRequest.node_id == node_id,
                    NodeLogRequest.answered_at.is_(None),
                    NodeLogRequest.seq <= row.seq,
                )
            )
            for pending in older:
                pending.answered_at, pending.text = now, text
        self._feed.bump()  # the request leaves the node's desired state

    def get(self, node_id: str, request_id: str) -> dict[str, Any]:
        """A request of node `node_id`: pending, or answered with the node's text.

        Raises:
            NotFound: no such request of that node (it may have been replaced by newer ones).
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            return _view(_request(session, node_id, request_id))
