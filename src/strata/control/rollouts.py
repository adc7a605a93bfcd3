"""Rollouts in the control plane: the operator's service (create, list, show, pause, resume, abort) and the
driver that carries the planner's decisions out.

The driver is thin: each `tick` loads every active rollout and what its nodes last reported, turns the rows into
plain values (`strata.control.entries`), observes the nodes with the pure `strata.control.eligibility_rule` (which
also says why the rollout may not reach a node), calls the pure `plan_rollout`, stores the resulting state
(`apply_actions`), and bumps the fleet generation when the set of released nodes or a rollout's status changed, so
long-polling nodes hear at once. Everything it needs is in the database, so a restarted server carries on where it
stopped. It runs after status reports (debounced) and on a timer (`ServerSettings.rollout_interval_s`), from
`strata.control.app`, on the one replica that holds the `rollouts` lease (`strata.control.lease`). Every step, and
every operator change, begins its transaction with `serialize` (set by the control plane): steps and changes made by
different replicas at once take turns, and each plans from what the one before it stored, so no action is applied
twice.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, selectinload

from strata.control.db import Database, ModelVersion, Node, Rollout, RolloutNode, runnable_version
from strata.control.eligibility_rule import ActiveDeployment, FleetNode, observe_fleet
from strata.control.entries import fleet_node, is_online, release_of
from strata.control.errors import StoreError
from strata.control.events import NewEvent, record_event, rollout_events
from strata.control.feed import ChangeFeed
from strata.control.gates import Baseline, DriftFigure, GateResult
from strata.control.presence import PresenceTracker
from strata.control.rollout_plan import (
    ACTIVE,
    NodeAssignment,
    RolloutSpec,
    RolloutState,
    apply_actions,
    member_states,
    plan_rollout,
)
from strata.core.errors import Conflict, NotFound
from strata.core.logformat import Quieted
from strata.core.wire import NodeStatus, ProtocolError, parse_labels

log = logging.getLogger(__name__)

PLANNING_FAILED_LOG_S: Final = 60.0
"""How often a rollout whose step keeps failing is logged again (the driver steps every few seconds)."""


# --- what the service returns ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutNodeView:
    """One node of a rollout as `strata rollout status` shows it."""

    node_id: str
    name: str
    wave: int | None
    state: str
    previous_version: str | None
    current_version: str | None
    online: bool
    excluded: str | None
    failure: str | None
    refused: bool  # kept out because the node itself refused the version (`NodeAssignment.refused`): for good


@dataclass(frozen=True)
class RolloutExclusion:
    """A node the rollout keeps out, and why; `refused`: the node itself refused the version (its own policy or
    hardware said no once released), so it stays out even when nothing else keeps it out."""

    node: str
    reason: str
    refused: bool


@dataclass(frozen=True)
class RolloutView:
    """A rollout: what, where, how, where it stands, the gates' last numbers, and (with `nodes`) every node."""

    id: str
    model: str
    version: str
    selector: dict[str, str]
    spec: dict[str, Any]
    status: str
    wave: int
    waves: int
    wave_started_at: float | None
    created_at: float
    finished_at: float | None
    message: str
    counts: dict[str, int]
    waves_detail: list[dict[str, Any]]
    gate_results: list[dict[str, Any]]
    failed_gate: dict[str, Any] | None
    excluded: list[RolloutExclusion]
    nodes: list[RolloutNodeView] = field(default_factory=list)


# --- conversions between rows and the planner's state ---------------------------------------------------


def _assignment(row: RolloutNode) -> NodeAssignment:
    return NodeAssignment(
        node_id=row.node_id,
        wave=row.wave,
        previous_version=row.previous_version,
        order=row.position,
        excluded=row.excluded,
        released_at=row.released_at,
        healthy_at=row.healthy_at,
        failed_at=row.failed_at,
        failure=row.failure,
        ever_on_target=row.ever_on_target,
        refused=row.refused,
    )


def state_of(row: Rollout, node_rows: Iterable[RolloutNode]) -> RolloutState:
    """The planner's view of a stored rollout.

    Raises:
        ConfigError: the stored spec does not parse (written by a newer strata, say).
    """
    return RolloutState(
        id=row.id,
        model=row.version.model.name,
        version=row.version.version,
        selector=dict(row.selector),
        spec=RolloutSpec.from_json(row.spec),
        created_at=row.created_at,
        status=row.status,
        wave=row.wave,
        wave_started_at=row.wave_started_at,
        nodes={n.node_id: _assignment(n) for n in node_rows},
        gate_results=tuple(GateResult.from_json(g) for g in row.gate_results),
        failed_gate=GateResult.from_json(row.failed_gate) if row.failed_gate else None,
        baseline=Baseline.from_json(row.baseline),
        message=row.message,
        finished_at=row.finished_at,
    )


def _store(session: Session, row: Rollout, rows: dict[str, RolloutNode], old: RolloutState, new: RolloutState) -> None:
    row.status = new.status
    row.wave = new.wave
    row.wave_started_at = new.wave_started_at
    row.gate_results = [g.to_json() for g in new.gate_results]
    row.failed_gate = new.failed_gate.to_json() if new.failed_gate else None
    row.baseline = new.baseline.to_json()
    row.message = new.message[:2000]
    row.finished_at = new.finished_at
    for node_id, assignment in new.nodes.items():
        if old.nodes.get(node_id) == assignment:
            continue
        stored = rows.get(node_id)
        if stored is None:
            stored = RolloutNode(rollout_id=row.id, node_id=node_id)
            session.add(stored)
            rows[node_id] = stored
        stored.wave = assignment.wave
        stored.position = assignment.order
        stored.previous_version = assignment.previous_version
        stored.excluded = assignment.excluded
        stored.released_at = assignment.released_at
        stored.healthy_at = assignment.healthy_at
        stored.failed_at = assignment.failed_at
        stored.failure = assignment.failure
        stored.ever_on_target = assignment.ever_on_target
        stored.refused = assignment.refused


# --- the service ----------------------------------------------------------------------------------------


class RolloutService:
    """Creates rollouts and answers about them; `tick` is the driver (see the module docstring).

    One lock serialises ticks and operator changes, so a pause never races with a wave the driver starts.
    """

    def __init__(
        self,
        db: Database,
        feed: ChangeFeed,
        presence: PresenceTracker,
        clock: Callable[[], float],
        online_window_s: float,
        load_pins: Callable[[Session], list[ActiveDeployment]],
    ) -> None:
        self._db = db
        self._feed = feed
        self._presence = presence
        self._clock = clock
        self._online_window_s = online_window_s
        self._load_pins = load_pins
        self._lock = threading.RLock()
        # Called first in every transaction that reads and writes rollouts: one at a time across replicas.
        self.serialize: Callable[[Session], None] | None = None
        self._parsed: dict[str, tuple[str, NodeStatus | None]] = {}
        self._planning_failed = Quieted(PLANNING_FAILED_LOG_S)
        # Node id -> drift of (model, version) since a time (None: no reference): telemetry's, when wired in.
        self.drift: Callable[[str, str, float], Mapping[str, DriftFigure] | None] | None = None

    # --- operator calls ---------------------------------------------------------------------------------

    def create(self, model: str, version: str, selector: Mapping[str, str], spec: RolloutSpec) -> RolloutView:
        """Start rolling `model` `version` out to the nodes `selector` matches; the first waves are chosen at once.

        Raises:
            NotFound: no such model or version.
            ProtocolError: the selector is malformed, or the version has no variants.
            Conflict: another rollout of this model is still running or paused.
            StoreError: the database failed.
        """
        selector = parse_labels(dict(selector), "selector")
        with self._lock:
            with self._db.transaction() as session:
                self._serialize(session)
                row = runnable_version(session, model, version, "roll out")
                running = session.scalar(
                    select(Rollout.id)
                    .join(ModelVersion)
                    .where(ModelVersion.model_id == row.model_id, Rollout.status.in_(ACTIVE))
                )
                if running is not None:
                    raise Conflict(f"rollout {running} of {model} is still active; abort it or let it finish first")
                rollout = Rollout(
                    version=row,
                    selector=selector,
                    spec=spec.to_json(),
                    status="running",
                    wave=0,
                    wave_started_at=None,
                    gate_results=[],
                    failed_gate=None,
                    baseline={},
                    message="created",
                    created_at=self._clock(),
                    finished_at=None,
                )
                session.add(rollout)
                session.flush()
                rollout_id = rollout.id
                shown = ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "every node"
                message = f"rollout {rollout_id}: {model} {version} to {shown} started"
                started = NewEvent("rollout", message, model=model, version=version, rollout_id=rollout_id)
                record_event(session, rollout.created_at, started)
            self.tick()
        return self.get(str(rollout_id))

    def list(self) -> list[RolloutView]:
        """Every rollout, newest first, without per-node detail.

        Raises:
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            rows = session.scalars(select(Rollout).options(*_ROLLOUT_LOADS).order_by(Rollout.id.desc())).all()
            return [self._view(session, row, with_nodes=False) for row in rows]

    def get(self, rollout_id: str) -> RolloutView:
        """One rollout with every node's part.

        Raises:
            NotFound: no such rollout.
            StoreError: the database failed.
        """
        with self._db.transaction() as session:
            return self._view(session, self._row(session, rollout_id), with_nodes=True)

    def pause(self, rollout_id: str) -> RolloutView:
        """Stop starting waves and releasing nodes; nodes keep what they run.

        Raises:
            NotFound: no such rollout.
            Conflict: it is not running.
            StoreError: the database failed.
        """
        return self._transition(rollout_id, ("running",), "paused", "paused by the operator")

    def resume(self, rollout_id: str) -> RolloutView:
        """Carry on a paused rollout (after a failed gate too: the gates judge the wave again when it settles). The
        wave's deadline starts again from the resume.

        Raises:
            NotFound: no such rollout.
            Conflict: it is not paused.
            StoreError: the database failed.
        """
        view = self._transition(rollout_id, ("paused",), "running", "resumed by the operator")
        self.tick()
        return self.get(view.id)

    def abort(self, rollout_id: str) -> RolloutView:
        """End the rollout and send every node of it back to the version it had.

        Raises:
            NotFound: no such rollout.
            Conflict: it has finished already.
            StoreError: the database failed.
        """
        return self._transition(rollout_id, ACTIVE, "aborted", "aborted by the operator: nodes return to what they had")

    def _transition(self, rollout_id: str, allowed: Iterable[str], status: str, message: str) -> RolloutView:
        allowed = tuple(allowed)
        with self._lock:
            with self._db.transaction() as session:
                self._serialize(session)
                row = self._row(session, rollout_id)
                if row.status not in allowed:
                    raise Conflict(f"rollout {row.id} is {row.status}; it must be {' or '.join(allowed)}")
                row.status = status
                row.message = message
                record_event(
                    session,
                    self._clock(),
                    NewEvent(
                        "rollout",
                        f"rollout {row.id}: {status} ({message})",
                        model=row.version.model.name,
                        version=row.version.version,
                        rollout_id=row.id,
                    ),
                )
                if status == "running":
                    row.failed_gate = None
                    if row.wave_started_at is not None:
                        # The wave's deadline counts from the resume: a wave paused for want of data by its deadline
                        # (or paused past it) was failed again in the resume's own step, with no time to settle.
                        row.wave_started_at = self._clock()
                if status == "aborted":
                    row.finished_at = self._clock()
            self._feed.bump()
        return self.get(rollout_id)

    # --- the driver -------------------------------------------------------------------------------------

    def tick(self) -> int:
        """Plan and apply one step of every active rollout; return how many rollouts changed.

        Raises:
            StoreError: the database failed (nothing of this step is stored; the next tick tries again).
        """
        now = self._clock()
        changed = 0
        desired_changed = False
        with self._db.transaction() as session:  # most ticks find nothing to do: no write lock for them
            if session.scalar(select(Rollout.id).where(Rollout.status.in_(ACTIVE)).limit(1)) is None:
                return 0
        with self._lock, self._db.transaction() as session:
            self._serialize(session)
            rows = session.scalars(
                select(Rollout).options(*_ROLLOUT_LOADS).where(Rollout.status.in_(ACTIVE)).order_by(Rollout.id)
            ).all()
            if not rows:
                return 0
            nodes = self._fleet(session, now)
            pins = self._load_pins(session)
            for row in rows:
                node_rows = {
                    n.node_id: n
                    for n in session.scalars(select(RolloutNode).where(RolloutNode.rollout_id == row.id)).all()
                }
                try:
                    state = state_of(row, node_rows.values())
                    since = state.wave_started_at or state.created_at
                    drift = self.drift(state.model, state.version, since) if self.drift is not None else None
                    observations = observe_fleet(state, nodes, release_of(row.version), pins, drift)
                    actions = plan_rollout(state, observations, now)
                    new = apply_actions(state, actions) if actions else state
                except (StoreError, SQLAlchemyError):
                    raise  # the database: this step is not stored, the next tick tries again
                except Exception:
                    # A rollout that cannot be planned (a stored spec this version cannot read, a bug) stops only
                    # itself: the other rollouts go on. Logged once a minute per rollout, with the traceback.
                    if self._planning_failed.due(str(row.id), now):
                        log.exception("rollout %d: its step failed and is skipped; the other rollouts go on", row.id)
                    continue
                if not actions:
                    continue
                _store(session, row, node_rows, state, new)
                for event in rollout_events(state, new):
                    record_event(session, now, event)
                changed += 1
                if new.status != state.status:
                    log.info("rollout %d of %s %s: %s (%s)", row.id, new.model, new.version, new.status, new.message)
                desired_changed |= new.status != state.status or new.released != state.released
        if desired_changed:
            self._feed.bump()
        return changed

    def _serialize(self, session: Session) -> None:
        if self.serialize is not None:
            self.serialize(session)

    def _fleet(self, session: Session, now: float) -> tuple[FleetNode, ...]:
        """The live nodes, loaded once per tick and shared by every rollout."""
        return tuple(
            fleet_node(node, self._status(node), is_online(node, self._presence, now, self._online_window_s))
            for node in session.scalars(select(Node).where(Node.revoked_at.is_(None))).all()
        )

    def _status(self, node: Node) -> NodeStatus | None:
        """The node's last report, parsed once per distinct document."""
        document = node.status or ""
        cached = self._parsed.get(node.id)
        if cached is not None and cached[0] == document:
            return cached[1]
        parsed: NodeStatus | None = None
        if document:
            try:
                parsed = NodeStatus.from_json(json.loads(document))
            except (ValueError, ProtocolError):
                parsed = None
        self._parsed[node.id] = (document, parsed)
        return parsed

    # --- views ------------------------------------------------------------------------------------------

    @staticmethod
    def _row(session: Session, rollout_id: str) -> Rollout:
        if not rollout_id.isdecimal():
            raise NotFound(f"no rollout {rollout_id!r}")
        row = session.scalar(select(Rollout).options(*_ROLLOUT_LOADS).where(Rollout.id == int(rollout_id)))
        if row is None:
            raise NotFound(f"no rollout {rollout_id!r}")
        return row

    def _view(self, session: Session, row: Rollout, with_nodes: bool) -> RolloutView:
        node_rows = session.scalars(select(RolloutNode).where(RolloutNode.rollout_id == row.id)).all()
        state = state_of(row, node_rows)
        counts: dict[str, int] = {}
        # A finished rollout counts what its nodes ended as, not where they stood when it ended ("updating").
        waves: list[dict[str, Any]] = [
            {"wave": i + 1, "target": w.text, "nodes": 0, **dict.fromkeys(member_states(state.status), 0)}
            for i, w in enumerate(state.spec.waves)
        ]
        for assignment in state.nodes.values():
            outcome = assignment.outcome(state.status)
            counts[outcome] = counts.get(outcome, 0) + 1
            if assignment.wave is not None and assignment.excluded is None:
                detail = waves[assignment.wave]
                detail["nodes"] += 1
                detail[outcome] += 1
        excluded_rows = [a for a in state.nodes.values() if a.excluded is not None]
        now = self._clock()
        known: dict[str, tuple[str, str | None, bool]] = {}
        if with_nodes or excluded_rows:
            # Every node, filtered here: an IN list of a large fleet's ids would pass SQLite's variable limit.
            for node in session.scalars(select(Node)).all():
                if node.id not in state.nodes:
                    continue
                status = self._status(node)
                running = next((m for m in status.models if m.name == state.model), None) if status else None
                online = is_online(node, self._presence, now, self._online_window_s)
                known[node.id] = (node.name, running.version if running else None, online)

        def name(node_id: str) -> str:
            return known[node_id][0] if node_id in known else node_id

        excluded = [
            RolloutExclusion(name(a.node_id), a.excluded or "", a.refused)
            for a in sorted(excluded_rows, key=lambda a: name(a.node_id))
        ]
        nodes: list[RolloutNodeView] = []
        if with_nodes:
            for assignment in sorted(state.nodes.values(), key=lambda a: (a.wave is None, a.wave or 0, a.order)):
                _, current, online = known.get(assignment.node_id, (assignment.node_id, None, False))
                nodes.append(
                    RolloutNodeView(
                        node_id=assignment.node_id,
                        name=name(assignment.node_id),
                        wave=None if assignment.wave is None else assignment.wave + 1,
                        state=assignment.outcome(state.status),
                        previous_version=assignment.previous_version,
                        current_version=current,
                        online=online,
                        excluded=assignment.excluded,
                        failure=assignment.failure,
                        refused=assignment.refused,
                    )
                )
        return RolloutView(
            id=str(row.id),
            model=state.model,
            version=state.version,
            selector=dict(state.selector),
            spec=state.spec.to_json(),
            status=state.status,
            wave=state.wave + 1,
            waves=len(state.spec.waves),
            wave_started_at=state.wave_started_at,
            created_at=state.created_at,
            finished_at=state.finished_at,
            message=state.message,
            counts=counts,
            waves_detail=waves,
            gate_results=[g.to_json() for g in state.gate_results],
            failed_gate=state.failed_gate.to_json() if state.failed_gate else None,
            excluded=excluded,
            nodes=nodes,
        )


_ROLLOUT_LOADS = (
    selectinload(Rollout.version).selectinload(ModelVersion.model),
    selectinload(Rollout.version).selectinload(ModelVersion.variants),
)
