"""Deployments: which version of a model should run on the nodes a label selector matches.

Creating or deleting one bumps the fleet generation, so long-polling nodes learn about it at once. The rule that
turns deployments (with rollouts and pins) into per-node desired states lives in `strata.control.desired`; this
module loads its input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from strata.control.db import Database, Deployment, ModelVersion, Node, Rollout, RolloutNode, runnable_version
from strata.control.desired import ActiveDeployment, count_matching
from strata.control.feed import ChangeFeed
from strata.control.rollout_plan import ACTIVE
from strata.control.rollouts import load_pin_entries, variant_policies, variant_refs
from strata.core.errors import NotFound
from strata.core.wire import parse_labels


@dataclass(frozen=True)
class DeploymentInfo:
    """A deployment as the API shows it, with how many live nodes its selector matches now."""

    id: str
    model: str
    version: str
    selector: dict[str, str]
    created_at: float
    matched_nodes: int


def load_active_deployments(session: Session) -> tuple[ActiveDeployment, ...]:
    """Every entry of the desired-state rule with its version's variants and their policies: deployments,
    rollouts that are active (limited to their released nodes) or succeeded, and pins.

    Raises:
        SQLAlchemyError: the query failed (callers run it inside `Database.transaction`, which wraps it).
    """
    with_version = (
        selectinload(Deployment.version).selectinload(ModelVersion.variants),
        selectinload(Deployment.version).selectinload(ModelVersion.model),
    )
    entries = [
        ActiveDeployment(
            id=row.id,
            model=row.version.model.name,
            version=row.version.version,
            selector=dict(row.selector),
            created_at=row.created_at,
            variants=variant_refs(row.version),
            policies=variant_policies(row.version),
        )
        for row in session.scalars(select(Deployment).options(*with_version)).all()
    ]
    rollouts = session.scalars(
        select(Rollout)
        .options(
            selectinload(Rollout.version).selectinload(ModelVersion.variants),
            selectinload(Rollout.version).selectinload(ModelVersion.model),
        )
        .where(Rollout.status.in_((*ACTIVE, "succeeded")))
    ).all()
    released: dict[int, set[str]] = {}
    for rollout_id, node_id in session.execute(
        select(RolloutNode.rollout_id, RolloutNode.node_id)
        .join(Rollout)
        .where(
            Rollout.status.in_(ACTIVE),
            RolloutNode.released_at.is_not(None),
            RolloutNode.excluded.is_(None),
        )
    ):
        released.setdefault(rollout_id, set()).add(node_id)
    entries.extend(
        ActiveDeployment(
            id=row.id,
            model=row.version.model.name,
            version=row.version.version,
            selector=dict(row.selector),
            created_at=row.created_at,
            variants=variant_refs(row.version),
            kind="rollout",
            only_nodes=None if row.status == "succeeded" else frozenset(released.get(row.id, ())),
            policies=variant_policies(row.version),
        )
        for row in rollouts
    )
    entries.extend(load_pin_entries(session))
    return tuple(entries)


def _live_labels(session: Session) -> list[dict[str, str]]:
    return list(session.scalars(select(Node.labels).where(Node.revoked_at.is_(None))).all())


def _info(row: Deployment, fleet_labels: list[dict[str, str]]) -> DeploymentInfo:
    return DeploymentInfo(
        id=str(row.id),
        model=row.version.model.name,
        version=row.version.version,
        selector=dict(row.selector),
        created_at=row.created_at,
        matched_nodes=count_matching(row.selector, fleet_labels),
    )


def _parse_id(deployment_id: str) -> int:
    if not deployment_id.isdecimal():
        raise NotFound(f"no deployment {deployment_id!r}")
    return int(deployment_id)


class DeploymentService:
    """Creates, lists and deletes deployments."""

    def __init__(self, db: Database, feed: ChangeFeed, clock: Callable[[], float]) -> None:
        self._db = db
        self._feed = feed
        self._clock = clock

    def create(self, model: str, version: str, selector: Mapping[str, str]) -> DeploymentInfo:
        """Pin `model` at `version` on the nodes `selector` matches (empty: every node).

        Raises:
            NotFound: no such model or version.
            ProtocolError: the selector has an empty key, or the version has no variants to run.
            StoreError: the database failed.
        """
        selector = parse_labels(dict(selector), "selector")
        with self._db.transaction() as session:
            row = runnable_version(session, model, version, "deploy")
            deployment = Deployment(version=row, selector=selector, created_at=self._clock())
            session.add(deployment)
            session.flush()
            info = _info(deployment, _live_labels(session))
        self._feed.bump()
        return info

    def list(self) -> list[DeploymentInfo]:
        """Every deployment, newest first.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.scalars(
                select(Deployment)
                .options(selectinload(Deployment.version).selectinload(ModelVersion.model))
                .order_by(Deployment.created_at.desc(), Deployment.id.desc())
            ).all()
            fleet_labels = _live_labels(session)
            return [_info(row, fleet_labels) for row in rows]

    def delete(self, deployment_id: str) -> None:
        """Remove a deployment; the nodes it decided fall back to the next matching one, or drop the model.

        Raises:
            NotFound: no such deployment.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            row = session.get(Deployment, _parse_id(deployment_id))
            if row is None:
                raise NotFound(f"no deployment {deployment_id!r}")
            session.delete(row)
        self._feed.bump()
