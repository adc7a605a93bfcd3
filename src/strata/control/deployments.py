"""Deployments: which version of a model should run on the nodes a label selector matches.

Creating or deleting one bumps the fleet generation, so long-polling nodes learn about it at once. The rule that
turns deployments (with rollouts and pins) into per-node desired states lives in `strata.control.desired`; this
module loads its input, and says how far a deployment got: `node_progress` is the pure part (for each node its
selector matches: running it, on its way, failed, unable to run it, kept by a policy, or decided by another entry).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from strata.control.db import Database, Deployment, ModelVersion, Node, Rollout, RolloutNode, runnable_version
from strata.control.desired import decide
from strata.control.eligibility_rule import ActiveDeployment, FleetNode, runnable_variants
from strata.control.entries import fleet_node, is_online, load_pin_entries, release_of
from strata.control.events import NewEvent, record_event
from strata.control.feed import ChangeFeed
from strata.control.presence import PresenceTracker
from strata.control.rollout_plan import ACTIVE
from strata.core.errors import Conflict, NotFound
from strata.core.wire import NodeStatus, ProtocolError, parse_labels
from strata.core.words import plural

# A node's part in a deployment. `running`, `failed` and `pending` count towards it; the other three say why a node
# the selector matches will not run it: no variant its hardware runs, a placement policy, another entry decides.
NODE_STATES: Final = ("running", "pending", "failed", "no-variant", "excluded", "superseded")
TARGETED: Final = frozenset({"running", "pending", "failed"})


@dataclass(frozen=True)
class NodeProgress:
    """One node's part in a deployment: its state (see `NODE_STATES`), why, and what it runs of the model now."""

    node_id: str
    name: str
    state: str
    detail: str
    online: bool
    running: str | None


def node_progress(entry: ActiveDeployment, node: FleetNode, entries: Iterable[ActiveDeployment]) -> NodeProgress | None:
    """How far `entry` got on `node` (None: its selector does not match the node). `entries` is every entry of the
    desired-state rule (`entry` among them), so a newer deployment, a rollout or a pin that decides the node
    instead is named."""
    if not entry.applies_to(node.id, node.labels):
        return None
    current = next((m for m in node.status.models if m.name == entry.model), None) if node.status else None
    running = current.version if current is not None else None

    def progress(state: str, detail: str) -> NodeProgress:
        return NodeProgress(node.id, node.facts.name, state, detail, node.online, running)

    decided, refused = decide(node.id, node.labels, entries, node.facts)
    winner = decided.get(entry.model)
    if winner is None or winner.deployment.source != entry.source:
        for candidate, decision in refused.get(entry.model, []):
            if candidate.source == entry.source:
                return progress("excluded", f"policy {decision.rule}: {decision.reason}")
        assert winner is not None  # the entry applies to the node: it decides, is refused, or another one wins
        other = winner.deployment
        return progress("superseded", f"{other.kind} {other.id} decides: {other.model} {other.version}")
    if not runnable_variants(node.hardware, winner.variants):
        profiles = ", ".join(sorted({v.profile for v in winner.variants}))
        return progress("no-variant", f"profile {node.hardware} runs none of its variants (built for {profiles})")
    if running == entry.version:
        return progress("running", f"variant {current.variant}" if current is not None else "")
    failure = next(
        (
            f
            for f in (node.status.failures if node.status else ())
            if (f.model, f.version) == (entry.model, entry.version)
        ),
        None,
    )
    if failure is not None:
        return progress("failed", f"{failure.kind}: {failure.reason}")
    return progress("pending", "on its way" if node.online else "offline: it updates when it is back")


@dataclass(frozen=True)
class DeploymentInfo:
    """A deployment as the API shows it, with how many live nodes its selector matches now."""

    id: str
    model: str
    version: str
    selector: dict[str, str]
    created_at: float
    matched_nodes: int
    counts: dict[str, int] = field(default_factory=dict)
    nodes: list[NodeProgress] = field(default_factory=list)
    runnable_nodes: int = 0
    done: bool = False


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
        release_of(row.version).entry(row.id, row.created_at, row.selector)
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
        release_of(row.version).entry(
            row.id,
            row.created_at,
            row.selector,
            kind="rollout",
            only_nodes=None if row.status == "succeeded" else frozenset(released.get(row.id, ())),
        )
        for row in rollouts
    )
    entries.extend(load_pin_entries(session))
    return tuple(entries)


def _info(row: Deployment, progress: list[NodeProgress], with_nodes: bool) -> DeploymentInfo:
    counts = dict.fromkeys(NODE_STATES, 0)
    for item in progress:
        counts[item.state] += 1
    return DeploymentInfo(
        id=str(row.id),
        model=row.version.model.name,
        version=row.version.version,
        selector=dict(row.selector),
        created_at=row.created_at,
        matched_nodes=len(progress),
        counts=counts,
        nodes=sorted(progress, key=lambda p: p.name) if with_nodes else [],
        runnable_nodes=sum(1 for p in progress if p.state in TARGETED),
        done=counts["pending"] == 0,
    )


def _stored(session: Session, deployment_id: str) -> Deployment:
    """The deployment of this id.

    Raises:
        NotFound: no such deployment.
    """
    row = session.get(Deployment, int(deployment_id)) if deployment_id.isdecimal() else None
    if row is None:
        raise NotFound(f"no deployment {deployment_id!r}")
    return row


def stored_status(document: str | None) -> NodeStatus | None:
    """A node's last report as the control plane stored it (None: none yet, or one this version cannot read)."""
    if not document:
        return None
    try:
        return NodeStatus.from_json(json.loads(document))
    except (ValueError, ProtocolError):
        return None


class DeploymentService:
    """Creates, lists and deletes deployments, and says how far each got."""

    def __init__(
        self,
        db: Database,
        feed: ChangeFeed,
        clock: Callable[[], float],
        presence: PresenceTracker | None = None,
        online_window_s: float = 90.0,
    ) -> None:
        self._db = db
        self._feed = feed
        self._clock = clock
        self._presence = presence
        self._online_window_s = online_window_s

    def create(self, model: str, version: str, selector: Mapping[str, str], force: bool = False) -> DeploymentInfo:
        """Pin `model` at `version` on the nodes `selector` matches (empty: every node).

        A deployment that no matching node could run is refused (unless `force`): every node it matches lacks a
        variant for its hardware, so it would change the fleet's desired state to no effect but failures. One that
        matches no node now is made (the nodes may enroll later), and so is one a placement policy keeps from
        every node (the operator's rule, which a node may come to satisfy: a label, an attestation level).

        Raises:
            NotFound: no such model or version.
            ProtocolError: the selector has an empty key, or the version has no variants to run.
            Conflict: nodes match and none of them can run it (without `force`).
            StoreError: the database failed.
        """
        selector = parse_labels(dict(selector), "selector")
        now = self._clock()
        with self._db.transaction() as session:
            row = runnable_version(session, model, version, "deploy")
            deployment = Deployment(version=row, selector=selector, created_at=now)
            session.add(deployment)
            session.flush()
            info = self._progress(session, [deployment], with_nodes=True)[0]
            if info.matched_nodes and info.counts["no-variant"] == info.matched_nodes and not force:
                reasons = "; ".join(f"{p.name}: {p.detail}" for p in info.nodes[:5])
                raise Conflict(
                    f"no node can run {model} {version}: {plural(info.matched_nodes, 'node')} "
                    f"{'matches' if info.matched_nodes == 1 else 'match'} and none has a "
                    f"variant for its hardware ({reasons}); push a variant for their profile, or deploy anyway "
                    "with --force"
                )
            shown = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "every node"
            record_event(
                session,
                now,
                NewEvent("deployed", f"deployment {deployment.id}: {model} {version} to {shown}", None, model, version),
            )
        self._feed.bump()
        return info

    def list(self) -> builtins.list[DeploymentInfo]:
        """Every deployment, newest first, with its nodes counted by state.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.scalars(
                select(Deployment)
                .options(selectinload(Deployment.version).selectinload(ModelVersion.model))
                .order_by(Deployment.created_at.desc(), Deployment.id.desc())
            ).all()
            return self._progress(session, rows, with_nodes=False)

    def get(self, deployment_id: str) -> DeploymentInfo:
        """One deployment with every node its selector matches and how far it got there.

        Raises:
            NotFound: no such deployment.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            return self._progress(session, [_stored(session, deployment_id)], with_nodes=True)[0]

    def delete(self, deployment_id: str) -> None:
        """Remove a deployment; the nodes it decided fall back to the next matching one, or drop the model.

        Raises:
            NotFound: no such deployment.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            row = _stored(session, deployment_id)
            model, version = row.version.model.name, row.version.version
            session.delete(row)
            message = f"deployment {row.id}: {model} {version} removed"
            record_event(session, self._clock(), NewEvent("undeployed", message, None, model, version))
        self._feed.bump()

    def _progress(
        self, session: Session, rows: Sequence[Deployment], with_nodes: bool
    ) -> builtins.list[DeploymentInfo]:
        now = self._clock()
        entries = load_active_deployments(session)
        by_id = {e.id: e for e in entries if e.kind == "deployment"}
        fleet = [
            fleet_node(node, stored_status(node.status), is_online(node, self._presence, now, self._online_window_s))
            for node in session.scalars(select(Node).where(Node.revoked_at.is_(None))).all()
        ]
        infos = []
        for row in rows:
            entry = by_id[row.id]
            progress = [p for node in fleet if (p := node_progress(entry, node, entries)) is not None]
            infos.append(_info(row, progress, with_nodes))
        return infos
