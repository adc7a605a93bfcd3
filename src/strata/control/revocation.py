"""Which node certificates the fleet has revoked and are still valid: the list every node's desired state carries.

The control plane refuses a revoked node by itself (its current certificate's hash is no longer the node's), but
nodes check each other's certificates on their tier ports with nothing but the chain to the fleet CA. So every
certificate the CA issues is recorded with its expiry; revoking a node, or enrolling it again (which replaces its
key and credential), revokes all of its certificates that are still valid, and each node's desired state lists
their hashes so its peers refuse them. Renewal revokes nothing: the previous certificate may still carry
connections and expires a third of a lifetime later; it is recorded, so a later revocation covers it too.

An entry drops off the list once its certificate has expired (an expired certificate fails every handshake by
itself), so the list stays as short as the revocations of the last certificate lifetime. The decision is pure
(`unexpired`); the rest are thin helpers over one database session, called inside the fleet's transactions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from strata.control.db import NodeCertificate


def unexpired(entries: Iterable[tuple[str, float]], now: float) -> frozenset[str]:
    """The hashes of the (hash, not_after) entries whose certificate is still valid at `now`."""
    return frozenset(sha256 for sha256, not_after in entries if not_after > now)


# The most certificates one node may hold that are still valid and not revoked: an agent renews at two thirds of a
# lifetime, so it holds one (two for the moment after renewing). Each one a node holds is listed in every node's
# desired state once the node is revoked: without a bound, a compromised node renewing in a loop would grow the
# whole fleet's desired states by 67 bytes a renewal, for a certificate lifetime.
MAX_LIVE_CERTIFICATES: Final = 4


def live_certificates(session: Session, node_id: str, now: float) -> tuple[int, float | None]:
    """How many certificates recorded for `node_id` are still valid and not revoked at `now`, and when the first of
    them expires (None: there are none).

    Raises:
        SQLAlchemyError: the database failed.
    """
    row = session.execute(
        select(func.count(), func.min(NodeCertificate.not_after)).where(
            NodeCertificate.node_id == node_id, NodeCertificate.revoked_at.is_(None), NodeCertificate.not_after > now
        )
    ).one()
    return int(row[0]), None if row[1] is None else float(row[1])


def record_issued(
    session: Session, node_id: str, sha256: str, not_after: float, now: float, pem: str, issued_at: float
) -> None:
    """Remember a certificate just issued to `node_id` (its PEM and issue time, to answer a renewal again whose
    answer was lost), and forget the certificates that have expired.

    Raises:
        SQLAlchemyError: the database failed (the fleet's transaction turns it into a StoreError).
    """
    session.execute(delete(NodeCertificate).where(NodeCertificate.not_after <= now))
    session.add(NodeCertificate(sha256=sha256, node_id=node_id, not_after=not_after, pem=pem, issued_at=issued_at))


def revoke_issued(session: Session, node_id: str, current: str, latest_expiry: float, now: float) -> None:
    """Revoke every certificate of `node_id` still valid at `now`.

    `current` is the hash the node authenticates with: a certificate issued before certificates were recorded has
    no row, so it is added with `latest_expiry`, the latest its expiry can be (now plus a certificate lifetime).

    Raises:
        SQLAlchemyError: the database failed.
    """
    if session.get(NodeCertificate, current) is None and latest_expiry > now:
        session.add(NodeCertificate(sha256=current, node_id=node_id, not_after=latest_expiry, revoked_at=now))
        session.flush()
    session.execute(
        update(NodeCertificate)
        .where(
            NodeCertificate.node_id == node_id,
            NodeCertificate.revoked_at.is_(None),
            NodeCertificate.not_after > now,
        )
        .values(revoked_at=now)
    )


def revoked_certificates(session: Session, now: float) -> frozenset[str]:
    """The hashes of the fleet's revoked certificates that are still valid at `now`.

    Raises:
        SQLAlchemyError: the database failed.
    """
    rows = session.execute(
        select(NodeCertificate.sha256, NodeCertificate.not_after).where(
            NodeCertificate.revoked_at.is_not(None), NodeCertificate.not_after > now
        )
    ).all()
    return unexpired(((sha256, not_after) for sha256, not_after in rows), now)
