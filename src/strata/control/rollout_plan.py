"""The rollout planner, a pure function: `plan_rollout(rollout, observations, now) -> actions`, and
`apply_actions(rollout, actions) -> rollout`.

A rollout takes one model version to the nodes its selector matches, wave by wave. At its first step every
matching node is given a wave: the nodes are ordered so that early waves spread across regions, tiers and
hardware profiles (and prefer nodes that are online), and wave k holds the nodes up to its cumulative target
(`1%,10%,50%,100%` or counts). A node a placement policy or a pin keeps out is recorded with the reason and counts
in no wave.

When wave k starts its nodes are released: the desired-state rule gives released nodes the rollout's version and
everyone else what they had (`max_unavailable` limits how many online nodes update at once). A released node is
healthy once it reports the version active with its probation passed; it failed if it reports a failure of the
version (a load or golden-check failure, or a probation rollback). The wave settles when each of its nodes is
healthy for the bake time (whenever it became so), or failed, or, once the wave's deadline has passed, is offline
or gone (offline nodes get the version whenever they return, and do not hold the wave; online nodes still
updating, on probation or not released yet because of `max_unavailable` hold it past the deadline too). A wave
with nothing to judge at its deadline goes to the gates, whose no-data policy decides. Then the gates
(`strata.control.gates`) judge it: all pass and the next wave starts (the last one finishes the rollout); one
fails and the rollout rolls back (every node returns to what it had) or pauses, recording the gate and its
numbers. An activation success
rate that can no longer pass stops the rollout at once; it counts the nodes of every wave so far too, so a node
whose probation rolls back after its wave passed still counts against the rollout.

No clock, no I/O: the control plane's driver loads the rollout and the node observations from its database, and
the fleet simulator keeps them in memory; both run this same code.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from strata.control.gates import (
    DEFAULT_GATES,
    Baseline,
    DriftFigure,
    Gate,
    GateResult,
    Population,
    ServingSample,
    check_no_data_policy,
    doomed,
    evaluate_gates,
    summarize_baseline,
)
from strata.core.errors import ConfigError
from strata.core.wire import Failure, ServingCounters
from strata.core.words import duration, plural

ACTIVE: Final = ("running", "paused")
FINISHED: Final = ("succeeded", "rolled_back", "aborted")
ON_FAILURE: Final = ("rollback", "pause")
# Failures that say a node may not or cannot run the version: it is out of the rollout, not a failure of it.
EXCLUDING_FAILURES: Final = frozenset({"policy", "no-variant"})
_REFUSED_TEXT: Final = "the node refused it: "  # how a refusing node's exclusion reads (`NodeAssignment.refused`)
SPREAD_LABELS: Final = ("region", "tier", "profile")
GREEDY_PER_GROUP: Final = 4
# An online node not done this many wave deadlines after its release (and at least this long) counts as failed.
OVERDUE_DEADLINES: Final = 2
OVERDUE_MIN_S: Final = 600.0


# --- the spec -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaveSpec:
    """A wave's cumulative size: a percentage of the eligible nodes, or a count of them."""

    amount: float
    percent: bool

    @property
    def text(self) -> str:
        return f"{self.amount:g}%" if self.percent else f"{int(self.amount)}"

    def target(self, eligible: int) -> int:
        """How many eligible nodes the waves up to this one hold together (at least one when there are any)."""
        if eligible <= 0:
            return 0
        if self.percent:
            return min(eligible, max(1, math.ceil(self.amount * eligible / 100 - 1e-9)))
        return min(eligible, max(1, int(self.amount)))


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """`1%,10%,50%,100%` or `5,50,100%` -> waves; a last wave of 100% is added when missing.

    Raises:
        ConfigError: a term that is not a positive finite number or percentage, or targets that do not grow.
    """
    waves: list[WaveSpec] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        percent = term.endswith("%")
        try:
            amount = float(term[:-1] if percent else term)
        except ValueError:
            raise ConfigError(f"wave {term!r} is not a count or a percentage") from None
        if not math.isfinite(amount):  # nan passes every range check below, and neither plans as a wave size
            raise ConfigError(f"wave {term!r} must be a finite count or percentage")
        if amount <= 0 or (percent and amount > 100) or (not percent and amount != int(amount)):
            raise ConfigError(f"wave {term!r} must be a whole count above 0 or a percentage in (0, 100]")
        waves.append(WaveSpec(amount, percent))
    if not waves:
        raise ConfigError("a rollout needs at least one wave")
    for earlier, later in itertools.pairwise(waves):
        if earlier.percent == later.percent and later.amount <= earlier.amount:
            raise ConfigError(f"waves must grow: {later.text} follows {earlier.text}")
    if not (waves[-1].percent and waves[-1].amount == 100):
        waves.append(WaveSpec(100.0, True))
    return tuple(waves)


@dataclass(frozen=True)
class RolloutSpec:
    """How a rollout proceeds. Times in seconds."""

    waves: tuple[WaveSpec, ...] = (WaveSpec(1, True), WaveSpec(10, True), WaveSpec(50, True), WaveSpec(100, True))
    max_unavailable: int | None = None
    bake_s: float = 600.0
    gates: tuple[Gate, ...] = DEFAULT_GATES
    on_failure: str = "rollback"
    wave_deadline_s: float = 3600.0
    min_requests: int = 20
    on_no_data: str = "hold"
    min_drift_requests: int = 100

    def __post_init__(self) -> None:
        check_no_data_policy(self.on_no_data)
        if self.min_requests < 1 or self.min_drift_requests < 1:
            raise ConfigError("--min-requests and --min-drift-requests must be at least 1")
        if self.on_failure not in ON_FAILURE:
            raise ConfigError(f"--on-failure must be one of {list(ON_FAILURE)}, got {self.on_failure!r}")
        if self.max_unavailable is not None and self.max_unavailable < 1:
            raise ConfigError("--max-unavailable must be at least 1")
        if not (self.bake_s >= 0 and self.wave_deadline_s >= 0):  # nan compares false with everything
            raise ConfigError("bake time and wave deadline must be numbers, not negative")
        if not self.waves:
            raise ConfigError("a rollout needs at least one wave")

    def to_json(self) -> dict[str, Any]:
        return {
            "waves": [w.text for w in self.waves],
            "max_unavailable": self.max_unavailable,
            "bake_s": self.bake_s,
            "gates": [g.to_json() for g in self.gates],
            "on_failure": self.on_failure,
            "wave_deadline_s": self.wave_deadline_s,
            "min_requests": self.min_requests,
            "on_no_data": self.on_no_data,
            "min_drift_requests": self.min_drift_requests,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RolloutSpec:
        """Raises:
        ConfigError: a field is out of range or malformed.
        """
        try:
            return cls(
                waves=parse_waves(",".join(str(w) for w in raw["waves"])),
                max_unavailable=raw.get("max_unavailable"),
                bake_s=float(raw.get("bake_s", 600.0)),
                gates=tuple(Gate.from_json(g) for g in raw.get("gates", [g.to_json() for g in DEFAULT_GATES])),
                on_failure=str(raw.get("on_failure", "rollback")),
                wave_deadline_s=float(raw.get("wave_deadline_s", 3600.0)),
                min_requests=int(raw.get("min_requests", 20)),
                # rollouts stored before the no-data policy judged a gate without data as passed
                on_no_data=str(raw.get("on_no_data", "pass")),
                min_drift_requests=int(raw.get("min_drift_requests", 100)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"rollout spec is malformed: {exc}") from exc


# --- the state ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeAssignment:
    """One node's part in a rollout. Times are the control plane's."""

    node_id: str
    wave: int | None  # None: kept out (see `excluded`)
    previous_version: str | None
    order: int = 0
    excluded: str | None = None
    released_at: float | None = None
    healthy_at: float | None = None
    failed_at: float | None = None
    failure: str | None = None
    ever_on_target: bool = False
    refused: bool = False  # kept out because the node itself refused the version: it stays out for good

    @property
    def state(self) -> str:
        """pending, updating, healthy, failed or excluded."""
        if self.excluded is not None:
            return "excluded"
        if self.failed_at is not None:
            return "failed"
        if self.healthy_at is not None:
            return "healthy"
        if self.released_at is not None:
            return "updating"
        return "pending"

    def outcome(self, status: str) -> str:
        """The node's state in a rollout whose status is `status`: `state` while the rollout is active; once it has
        finished, what the node ended as. A succeeded rollout's version is every node's: healthy, or unconfirmed
        (it had not reported the version healthy). A rolled back or aborted one sends every node back to what it
        had: rolled_back (it had run the version) or unchanged (it never had). failed and excluded stay."""
        state = self.state
        if status not in FINISHED or state in ("failed", "excluded"):
            return state
        if status == "succeeded":
            return "healthy" if state == "healthy" else "unconfirmed"
        return "rolled_back" if self.ever_on_target or state == "healthy" else "unchanged"


def member_states(status: str) -> tuple[str, ...]:
    """The states `NodeAssignment.outcome` gives the members (not excluded) of a rollout whose status is `status`,
    in the order a table shows them."""
    if status == "succeeded":
        return ("healthy", "unconfirmed", "failed")
    if status in FINISHED:
        return ("rolled_back", "unchanged", "failed")
    return ("healthy", "updating", "pending", "failed")


@dataclass(frozen=True)
class RolloutState:
    """A rollout as the planner sees it: its spec, where it stands, and every node's part."""

    id: int
    model: str
    version: str
    selector: Mapping[str, str]
    spec: RolloutSpec
    created_at: float
    status: str = "running"
    wave: int = 0
    wave_started_at: float | None = None
    nodes: Mapping[str, NodeAssignment] = field(default_factory=dict)
    gate_results: tuple[GateResult, ...] = ()
    failed_gate: GateResult | None = None
    baseline: Baseline = field(default_factory=Baseline)
    message: str = ""
    finished_at: float | None = None

    @property
    def released(self) -> frozenset[str]:
        """The nodes the desired-state rule gives this rollout's version (while it is active)."""
        return self._index.released

    def members(self, wave: int) -> list[NodeAssignment]:
        """The nodes of one wave that are not kept out (do not change the list: states share it)."""
        return self._index.members.get(wave, [])

    @functools.cached_property
    def _index(self) -> _NodeIndex:
        return _NodeIndex.of(self.nodes)


@dataclass(frozen=True)
class _NodeIndex:
    """A rollout's nodes grouped the ways the planner asks for them, built in one pass over every node and then
    carried from state to state by `apply_actions`, which patches only the nodes it changed: a step then costs
    what changed, not the fleet."""

    position: Mapping[str, int]  # the node's place in `RolloutState.nodes`
    members: Mapping[int, list[NodeAssignment]]  # per wave, the nodes not kept out, in that order
    member_at: Mapping[str, tuple[int, int]]  # where a node stands in `members`
    released: frozenset[str]
    settled: Mapping[int, tuple[int, int]]  # per wave, how many members activated it and how many failed
    waiting: Mapping[int, Mapping[str, NodeAssignment]]  # per wave, the members not released yet
    unsettled: Mapping[int, Mapping[str, NodeAssignment]]  # per wave, the members neither healthy nor failed
    healthy: Mapping[int, list[float]]  # per wave, when each healthy member (not failed since) became so, sorted

    @classmethod
    def of(cls, nodes: Mapping[str, NodeAssignment]) -> _NodeIndex:
        position: dict[str, int] = {}
        members: dict[int, list[NodeAssignment]] = {}
        member_at: dict[str, tuple[int, int]] = {}
        released: list[str] = []
        settled: dict[int, tuple[int, int]] = {}
        waiting: dict[int, dict[str, NodeAssignment]] = {}
        unsettled: dict[int, dict[str, NodeAssignment]] = {}
        healthy: dict[int, list[float]] = {}
        for place, (node_id, assignment) in enumerate(nodes.items()):
            position[node_id] = place
            if assignment.excluded is not None:
                continue
            if assignment.released_at is not None:
                released.append(node_id)
            wave = assignment.wave
            if wave is None:
                continue
            group = members.setdefault(wave, [])
            member_at[node_id] = (wave, len(group))
            group.append(assignment)
            activated, failed = settled.get(wave, (0, 0))
            settled[wave] = (activated + _activated(assignment), failed + (assignment.failed_at is not None))
            if assignment.released_at is None:
                waiting.setdefault(wave, {})[node_id] = assignment
            if _unsettled(assignment):
                unsettled.setdefault(wave, {})[node_id] = assignment
            since = _healthy_since(assignment)
            if since is not None:
                healthy.setdefault(wave, []).append(since)
        for times in healthy.values():
            times.sort()
        return cls(position, members, member_at, frozenset(released), settled, waiting, unsettled, healthy)

    def patched(self, updates: Mapping[str, NodeAssignment]) -> _NodeIndex:
        """This index after `updates`: changes of existing nodes that keep their wave and exclusion (no Assign,
        Exclude or Include), which is every step of a rollout but the first and those that regroup nodes.
        What changes is copied first: states share what did not."""
        members = dict(self.members)
        settled = dict(self.settled)
        waiting = _Groups(self.waiting)
        unsettled = _Groups(self.unsettled)
        healthy = dict(self.healthy)
        copied: set[tuple[str, int]] = set()
        added: set[str] = set()
        dropped: set[str] = set()
        for node_id, assignment in updates.items():
            is_released = assignment.released_at is not None and assignment.excluded is None
            if is_released != (node_id in self.released):
                (added if is_released else dropped).add(node_id)
            spot = self.member_at.get(node_id)
            if spot is None:
                continue  # kept out, or in no wave
            wave, place = spot
            if ("members", wave) not in copied:
                members[wave] = list(members[wave])
                copied.add(("members", wave))
            before = members[wave][place]
            members[wave][place] = assignment
            activated, failed = settled[wave]
            activated += _activated(assignment) - _activated(before)
            settled[wave] = (activated, failed + (assignment.failed_at is not None) - (before.failed_at is not None))
            waiting.put(wave, node_id, assignment, assignment.released_at is None)
            unsettled.put(wave, node_id, assignment, _unsettled(assignment))
            was, since = _healthy_since(before), _healthy_since(assignment)
            if was != since:
                if ("healthy", wave) not in copied:
                    healthy[wave] = list(healthy.get(wave, []))
                    copied.add(("healthy", wave))
                if was is not None:
                    del healthy[wave][bisect.bisect_left(healthy[wave], was)]
                if since is not None:
                    bisect.insort(healthy[wave], since)
        released = (self.released - dropped) | added if added or dropped else self.released
        return _NodeIndex(
            self.position, members, self.member_at, released, settled, waiting.groups, unsettled.groups, healthy
        )


class _Groups:
    """Per wave, the members that meet some condition, copied on the first change of a wave."""

    def __init__(self, groups: Mapping[int, Mapping[str, NodeAssignment]]) -> None:
        self.groups: dict[int, Mapping[str, NodeAssignment]] = dict(groups)
        self._copied: dict[int, dict[str, NodeAssignment]] = {}

    def put(self, wave: int, node_id: str, assignment: NodeAssignment, member: bool) -> None:
        """Keep `assignment` in the wave's group when `member`, else leave it out."""
        if not member and node_id not in self.groups.get(wave, {}):
            return
        group = self._copied.get(wave)
        if group is None:
            group = self._copied[wave] = dict(self.groups.get(wave, {}))
            self.groups[wave] = group
        if member:
            group[node_id] = assignment
        else:
            del group[node_id]


def _activated(assignment: NodeAssignment) -> int:
    return assignment.failed_at is None and assignment.healthy_at is not None


def _unsettled(assignment: NodeAssignment) -> bool:
    return assignment.failed_at is None and assignment.healthy_at is None


def _healthy_since(assignment: NodeAssignment) -> float | None:
    return assignment.healthy_at if assignment.failed_at is None else None


@dataclass(frozen=True)
class NodeObservation:
    """What the control plane knows of one matching node, for this rollout's model.

    `failure` is a failure the node reports about the rollout's version; `excluded` says why the rollout may not
    reach the node at all (a placement policy rule, a pin, no variant for its profile), None when it may; `drift`
    is its drift against the version's reference since the wave started, None when the package has no reference.
    """

    node_id: str
    labels: Mapping[str, str]
    tier: str
    profile: str
    online: bool
    version: str | None = None
    probation: str | None = None
    serving: ServingCounters | None = None
    failure: Failure | None = None
    excluded: str | None = None
    drift: DriftFigure | None = None


# --- actions --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    node_id: str
    wave: int | None
    previous_version: str | None
    order: int
    excluded: str | None = None


@dataclass(frozen=True)
class Exclude:
    node_id: str
    reason: str
    refused: bool = False  # the node refused the version itself (`NodeAssignment.refused`)


@dataclass(frozen=True)
class Include:
    node_id: str
    wave: int


@dataclass(frozen=True)
class StartWave:
    wave: int
    at: float


@dataclass(frozen=True)
class Release:
    node_ids: tuple[str, ...]
    at: float


@dataclass(frozen=True)
class MarkHealthy:
    node_id: str
    at: float


@dataclass(frozen=True)
class MarkFailed:
    node_id: str
    at: float
    reason: str


@dataclass(frozen=True)
class MarkOnTarget:
    node_id: str


@dataclass(frozen=True)
class RecordGates:
    results: tuple[GateResult, ...]
    baseline: Baseline


@dataclass(frozen=True)
class Halt:
    """A gate failed: roll back (every node returns to what it had) or pause."""

    gate: GateResult
    rollback: bool
    at: float


@dataclass(frozen=True)
class Complete:
    """The rollout is over: `succeeded`, or `aborted` when no node took part (`took_part` False). A succeeded rollout
    stands for its selector from then on (nodes that match later take its version), which one that judged no node
    must not: once a pin that kept every node out is gone, the whole selector would take the version at once."""

    at: float
    message: str = "every wave passed its gates"
    took_part: bool = True


@dataclass(frozen=True)
class Note:
    """Where the rollout stands, in words, for `strata rollout status`."""

    message: str


RolloutAction = (
    Assign | Exclude | Include | StartWave | Release | MarkHealthy | MarkFailed | MarkOnTarget | RecordGates | Halt
)
Action = RolloutAction | Complete | Note


# --- wave assignment ------------------------------------------------------------------------------------


def _jitter(rollout_id: int, node_id: str) -> int:
    """A stable pseudo-random number per (rollout, node): a reproducible shuffle without a random generator."""
    return int.from_bytes(hashlib.blake2b(f"{rollout_id}:{node_id}".encode(), digest_size=8).digest(), "big")


def spread_order(rollout_id: int, nodes: Sequence[NodeObservation]) -> list[str]:
    """Node ids in wave order: online nodes first, and among them each next node taken from the (region, tier,
    profile) group whose label values have been used least so far, so that early waves cover every region,
    tier and profile before taking a second node of any. Deterministic for a given rollout id.

    The greedy choice costs a pass over the groups per node, so it orders the first few nodes of every group
    (what early waves take); the rest follow round-robin over the groups.
    """

    def key(node: NodeObservation) -> tuple[str, str, str]:
        return (node.labels.get("region", ""), node.tier, node.profile)

    ordered: list[str] = []
    for online in (True, False):
        groups: dict[tuple[str, str, str], list[NodeObservation]] = {}
        for node in nodes:
            if node.online == online:
                groups.setdefault(key(node), []).append(node)
        queues = {
            k: sorted(members, key=lambda n: (_jitter(rollout_id, n.node_id), n.node_id))
            for k, members in groups.items()
        }
        used: list[dict[str, int]] = [{} for _ in SPREAD_LABELS]
        heads = dict.fromkeys(queues, 0)
        tiebreak = {k: _jitter(rollout_id, "|".join(k)) for k in queues}
        greedy_steps = GREEDY_PER_GROUP * len(queues)
        while heads and greedy_steps > 0:
            greedy_steps -= 1
            best = min(
                heads,
                key=lambda k: (sum(used[i].get(value, 0) for i, value in enumerate(k)), heads[k], tiebreak[k]),
            )
            ordered.append(queues[best][heads[best]].node_id)
            for i, value in enumerate(best):
                used[i][value] = used[i].get(value, 0) + 1
            heads[best] += 1
            if heads[best] == len(queues[best]):
                del heads[best]
        rotation = sorted(heads, key=lambda k: tiebreak[k])
        while rotation:
            remaining = []
            for k in rotation:
                ordered.append(queues[k][heads[k]].node_id)
                heads[k] += 1
                if heads[k] < len(queues[k]):
                    remaining.append(k)
            rotation = remaining
    return ordered


def wave_sizes(waves: Sequence[WaveSpec], eligible: int) -> list[int]:
    """Cumulative targets per wave, made non-decreasing (the last is every eligible node)."""
    sizes: list[int] = []
    for wave in waves:
        sizes.append(max(wave.target(eligible), sizes[-1] if sizes else 0))
    if sizes:
        sizes[-1] = eligible
    return sizes


def _assign(
    state: RolloutState, observations: Mapping[str, NodeObservation], changed: Collection[str] | None
) -> list[Action]:
    if changed is None:
        fresh_ids = observations.keys() - state.nodes.keys()
    else:  # a new node's observation is new: it is among the changed ones
        fresh_ids = {n for n in changed if n in observations and n not in state.nodes}
    if not fresh_ids:
        return []
    fresh = [observations[node_id] for node_id in sorted(fresh_ids)]
    actions: list[Action] = []
    for node in fresh:
        if node.excluded is not None:
            actions.append(Assign(node.node_id, None, node.version, -1, node.excluded))
    eligible = [n for n in fresh if n.excluded is None]
    if state.nodes:  # nodes that match after the rollout began join its last wave
        last = len(state.spec.waves) - 1
        base = max((a.order for a in state.nodes.values()), default=0) + 1
        for index, node_id in enumerate(spread_order(state.id, eligible)):
            actions.append(Assign(node_id, last, observations[node_id].version, base + index))
        return actions
    sizes = wave_sizes(state.spec.waves, len(eligible))
    wave = 0
    for position, node_id in enumerate(spread_order(state.id, eligible)):
        while position >= sizes[wave]:
            wave += 1
        actions.append(Assign(node_id, wave, observations[node_id].version, position))
    return actions


# --- progress -------------------------------------------------------------------------------------------


def _progress(
    state: RolloutState, observations: Mapping[str, NodeObservation], now: float, changed: Collection[str] | None
) -> list[Action]:
    actions: list[Action] = []
    last_wave = len(state.spec.waves) - 1
    if changed is None:
        looked_at: Iterable[tuple[str, NodeAssignment]] = state.nodes.items()
    else:  # the same nodes in the same order as a pass over all of them would act on
        position = state._index.position
        ids = sorted((n for n in changed if n in position), key=position.__getitem__)
        looked_at = [(n, state.nodes[n]) for n in ids]
    for node_id, assignment in looked_at:
        node = observations.get(node_id)
        if node is None:
            continue
        if assignment.released_at is None and assignment.excluded is None:  # the common case, kept cheap
            if node.excluded is not None:
                actions.append(Exclude(node_id, node.excluded))
            continue
        if assignment.excluded is not None:
            # A node kept out (a pin, a policy; before its release or after) joins the last wave once nothing keeps
            # it out; one that refused the version itself stays out.
            if node.excluded is None and not assignment.refused:
                actions.append(Include(node_id, last_wave))
            continue
        if assignment.released_at is None:
            continue
        on_target = node.version == state.version
        if on_target and not assignment.ever_on_target:
            actions.append(MarkOnTarget(node_id))
        failure = node.failure
        if failure is not None and failure.kind in EXCLUDING_FAILURES and not on_target:
            actions.append(Exclude(node_id, f"{_REFUSED_TEXT}{failure.reason}", refused=True))
            continue
        if assignment.failed_at is not None:
            continue
        if failure is not None and not on_target:
            if failure.kind == "probation" and not assignment.ever_on_target:
                actions.append(MarkOnTarget(node_id))
            actions.append(MarkFailed(node_id, now, f"{failure.kind}: {failure.reason}"))
        elif node.excluded is not None and not on_target:
            # Pinned (or a policy's rule turned against it) after its release: the pin wins, the node runs what it
            # says, and it no longer holds its wave (it held it to the deadline, "updating").
            actions.append(Exclude(node_id, node.excluded))
        elif on_target and node.probation != "running" and assignment.healthy_at is None:
            actions.append(MarkHealthy(node_id, now))
    return actions


def _release(state: RolloutState, observations: Mapping[str, NodeObservation], now: float) -> list[Action]:
    # In rollout order, and among equal orders in the order of `state.nodes`.
    index = state._index
    waiting = sorted(
        (a for wave, group in index.waiting.items() if wave <= state.wave for a in group.values()),
        key=lambda a: (a.order, index.position[a.node_id]),
    )
    if not waiting:
        return []
    limit = state.spec.max_unavailable
    if limit is None:
        chosen = [a.node_id for a in waiting]
    else:
        busy = sum(
            1
            for a in state.nodes.values()
            if a.state == "updating" and (o := observations.get(a.node_id)) is not None and o.online
        )
        room = max(0, limit - busy)
        online = [a.node_id for a in waiting if (o := observations.get(a.node_id)) is not None and o.online]
        chosen = online[:room]
    return [Release(tuple(chosen), now)] if chosen else []


def _outcomes(state: RolloutState, waves: range) -> tuple[int, int, int]:
    """(members, activated, failed) of these waves, as their nodes stand now."""
    members = activated = failed = 0
    for wave in waves:
        wave_activated, wave_failed = state._index.settled.get(wave, (0, 0))
        members += len(state.members(wave))
        activated += wave_activated
        failed += wave_failed
    return members, activated, failed


def _population(
    state: RolloutState, observations: Mapping[str, NodeObservation], wave: int, with_serving: bool
) -> Population:
    """The wave's evidence, with the earlier waves' activations (a node of an earlier wave may fail after its wave
    passed: its probation rolls back); the serving samples (a pass over every node) only when the gates are
    judged."""
    members, activated, failed = _outcomes(state, range(wave, wave + 1))
    earlier_members, earlier_activated, earlier_failed = _outcomes(state, range(wave))
    canary: list[ServingSample] = []
    baseline: list[ServingSample] = []
    drift: list[DriftFigure] = []
    referenced = False
    baseline_nodes = 0
    baseline_profiles: set[str] = set()
    for node_id, assignment in state.nodes.items() if with_serving else ():
        node = observations.get(node_id)
        if node is None or assignment.excluded is not None:
            continue
        referenced = referenced or node.drift is not None
        on_target = assignment.released_at is not None and node.version == state.version
        if on_target and node.drift is not None:
            drift.append(node.drift)
        on_baseline = assignment.released_at is None and node.version is not None and node.version != state.version
        baseline_nodes += on_baseline
        if on_baseline and node.online:  # an offline node reports nothing to wait for
            baseline_profiles.add(node.profile)
        if node.serving is None:
            continue
        sample = ServingSample(node.profile, node.serving)
        if on_target:
            canary.append(sample)
        elif on_baseline:
            baseline.append(sample)
    return Population(
        wave_members=members,
        activated=activated,
        failed=failed,
        canary=tuple(canary),
        baseline=tuple(baseline),
        recorded_baseline=state.baseline,
        min_requests=state.spec.min_requests,
        canary_drift=tuple(drift),
        drift_referenced=referenced,
        min_drift_requests=state.spec.min_drift_requests,
        baseline_nodes=baseline_nodes,
        baseline_profiles=frozenset(baseline_profiles),
        earlier_members=earlier_members,
        earlier_activated=earlier_activated,
        earlier_failed=earlier_failed,
    )


def _overdue(state: RolloutState, observations: Mapping[str, NodeObservation], now: float) -> list[Action]:
    """Released members of the waves so far still neither healthy nor failed, online, `OVERDUE_DEADLINES` wave
    deadlines (at least `OVERDUE_MIN_S`) after their release: failed. Past its deadline an online node holds its wave
    (`_settled`), and one whose update cannot finish (a disk too small for the version, a path to the blobs it cannot
    reach) while it polls on would hold it for ever; counted as failed, the gates judge it (activation success) and
    it no longer takes a `--max-unavailable` slot. An offline one stopped holding the wave at its deadline. (Past the
    deadline the driver steps at every tick, so no due time is needed for it.)"""
    limit = max(OVERDUE_DEADLINES * state.spec.wave_deadline_s, OVERDUE_MIN_S)
    actions: list[Action] = []
    for wave in range(state.wave + 1):
        for node_id, assignment in state._index.unsettled.get(wave, {}).items():
            released = assignment.released_at
            if released is None or assignment.excluded is not None or now < released + limit:
                continue
            node = observations.get(node_id)
            if node is None or not node.online:
                continue
            doing = "on probation" if node.version == state.version and node.probation == "running" else "updating"
            actions.append(MarkFailed(node_id, now, f"overdue: still {doing} {duration(limit)} after its release"))
    return actions


def _settled(state: RolloutState, wave: int, observations: Mapping[str, NodeObservation], now: float) -> str | None:
    """None when wave `wave` is settled, else what it still waits for.

    Every healthy member bakes until `healthy_at + bake_s`, whenever it became healthy: one that became so only
    after the deadline (back from offline, a deadline shorter than an activation) counts once it has baked; it was
    left out, and a wave of such nodes waited for ever. A member neither healthy nor failed holds the wave while it
    is online, whether it updates, is on probation or is not released yet (`--max-unavailable`), before the
    deadline and after: past it, they all stopped holding it, and the rollout went on (or succeeded) without them,
    sending the unreleased ones the version all at once, unjudged. Only an offline or gone member stops holding it
    at the deadline. Online members of earlier waves still not released (`--max-unavailable`) hold it too: the
    end of the rollout would give them the version at once.
    """
    started = state.wave_started_at if state.wave_started_at is not None else now
    past_deadline = now >= started + state.spec.wave_deadline_s
    index = state._index
    # Healthy members, sorted by when they became so, and so by when their bake ends.
    healthy = index.healthy.get(wave, [])
    baked = bisect.bisect_right(healthy, now, key=lambda at: at + state.spec.bake_s)
    baking = len(healthy) - baked
    updating = probation = unreleased = offline = 0
    for assignment in index.unsettled.get(wave, {}).values():
        node = observations.get(assignment.node_id)
        if node is None or not node.online:
            offline += not past_deadline
        elif assignment.released_at is None:
            unreleased += 1
        elif node.version == state.version and node.probation == "running":
            probation += 1
        else:
            updating += 1
    if state.spec.max_unavailable is not None:  # without a limit every waiting node is released at once
        for earlier in range(wave):
            for assignment in index.waiting.get(earlier, {}).values():
                node = observations.get(assignment.node_id)
                unreleased += node is not None and node.online
    if baking or updating or probation or unreleased or offline:
        counts = (
            (updating, "updating"),
            (probation, "on probation"),
            (unreleased, f"waiting for release (--max-unavailable {state.spec.max_unavailable})"),
            (baking, "baking"),
            (offline, "offline"),
        )
        parts = [f"{n} {what}" for n, what in counts if n]
        if past_deadline:
            until = "; past its deadline, only offline nodes stop holding it"
        else:
            until = f"; offline nodes stop holding it {duration(state.spec.wave_deadline_s)} after it started"
        return f"wave {wave + 1}: {', '.join(parts)}{until}"
    # Settled. A wave with nothing to judge (every member offline or gone at its deadline) goes to the gates too:
    # their no-data policy decides, as for any gate without data by the deadline.
    return None


def next_due(state: RolloutState, now: float) -> float:
    """The next time the rollout could move with no node reporting anything new: a healthy node's bake ending
    after `now`, or the wave's deadline (which may have passed). Infinity when it is not running a wave."""
    if state.status not in ACTIVE or state.wave_started_at is None:
        return math.inf
    due = state.wave_started_at + state.spec.wave_deadline_s
    healthy = state._index.healthy.get(state.wave, [])
    first = bisect.bisect_right(healthy, now, key=lambda at: at + state.spec.bake_s)
    if first < len(healthy):
        due = min(due, healthy[first] + state.spec.bake_s)
    return due


def plan_rollout(
    state: RolloutState,
    observations: Mapping[str, NodeObservation],
    now: float,
    changed: Collection[str] | None = None,
) -> list[Action]:
    """The next actions of a rollout, given what its nodes report now. Empty when there is nothing to do.

    `observations` holds every live node the rollout's selector matches, keyed by id.

    `changed` is for a caller that keeps `state` and `observations` from one step to the next (the simulator).
    When given, `state` must be the previous step's result with all of its actions applied, and `changed` must
    hold every node whose observation is new or differs from the one the previous step saw, and every node that
    step's actions named (`named_nodes`). Only those nodes are looked at one by one: the others would give no
    action, so the result is the same as without it. None (the control plane's driver): every node is looked at.
    """
    if state.status not in ACTIVE:
        return []
    actions = _assign(state, observations, changed)
    if actions:
        state = apply_actions(state, actions)
    progress = _progress(state, observations, now, changed)
    if progress:
        actions.extend(progress)
        state = apply_actions(state, progress)
    if state.status == "paused":
        return actions
    overdue = _overdue(state, observations, now)
    if overdue:
        actions.extend(overdue)
        state = apply_actions(state, overdue)
    wave = state.wave
    if state.wave_started_at is None:
        actions.append(StartWave(wave, now))
        state = apply_actions(state, [StartWave(wave, now)])
    release = _release(state, observations, now)
    if release:
        actions.extend(release)
        state = apply_actions(state, release)
    stop = doomed(state.spec.gates, _population(state, observations, wave, with_serving=False), wave)
    if stop is not None:
        actions.append(Halt(stop, state.spec.on_failure == "rollback", now))
        return actions
    if not state.members(wave):
        actions.extend(_past_empty_waves(state, observations, now))
        return actions
    waiting = _settled(state, wave, observations, now)
    if waiting is not None:
        if waiting != state.message:
            actions.append(Note(waiting))
        return actions
    population = _population(state, observations, wave, with_serving=True)
    deadline = (state.wave_started_at if state.wave_started_at is not None else now) + state.spec.wave_deadline_s
    results = tuple(evaluate_gates(state.spec.gates, population, wave, state.spec.on_no_data, now >= deadline))
    if results != state.gate_results:
        actions.append(RecordGates(results, summarize_baseline(population)))
    failed = next((r for r in results if not r.passed and not r.waiting), None)
    held = next((r for r in results if r.waiting), None)
    if failed is not None:
        actions.append(Halt(failed, state.spec.on_failure == "rollback", now))
    elif held is not None:
        message = (
            f"wave {wave + 1}: gate {held.gate.text} waits for data until "
            f"{duration(state.spec.wave_deadline_s)} after the wave started"
        )
        if message != state.message:
            actions.append(Note(message))
    elif wave + 1 < len(state.spec.waves):
        actions.append(StartWave(wave + 1, now))
        state = apply_actions(state, actions[-1:])
        actions.extend(_release(state, observations, now))
        if not state.members(wave + 1):
            actions.extend(_past_empty_waves(state, observations, now))
    else:
        actions.append(Complete(now))
    return actions


def _past_empty_waves(state: RolloutState, observations: Mapping[str, NodeObservation], now: float) -> list[Action]:
    """Start the first wave from the current one on that has nodes of its own (and release them), or finish the
    rollout when none has. A wave without nodes has nothing for its gates to judge: its target is the previous
    wave's (a fleet too small for every step of `1%,10%,50%,100%`), or every node it had is kept out or refused the
    version. Held, its gates would wait for data that cannot come until the deadline, then roll the rollout back.
    (Nodes that match later, or that nothing keeps out any more, join the last wave: only its members can change.)
    """
    actions: list[Action] = []
    wave = state.wave
    while not state.members(wave):
        if wave + 1 == len(state.spec.waves):
            if any(state.members(w) for w in range(wave)):
                actions.append(Complete(now))
            else:
                kept_out = sum(1 for a in state.nodes.values() if a.excluded is not None)
                actions.append(
                    Complete(
                        now,
                        f"no node took part: the selector matches {plural(kept_out, 'node')}, all kept out or"
                        " refusing the version (see the nodes kept out)"
                        if kept_out
                        else "no node took part: the selector matches no node",
                        took_part=False,
                    )
                )
            return actions
        wave += 1
        start = StartWave(wave, now)
        actions.append(start)
        state = apply_actions(state, [start])
    actions.extend(_release(state, observations, now))
    return actions


# --- applying -------------------------------------------------------------------------------------------


def named_nodes(actions: Iterable[Action]) -> set[str]:
    """The nodes whose part in the rollout `actions` change (see `plan_rollout`'s `changed`)."""
    named: set[str] = set()
    for action in actions:
        if isinstance(action, Release):
            named.update(action.node_ids)
        elif isinstance(action, Assign | Exclude | Include | MarkHealthy | MarkFailed | MarkOnTarget):
            named.add(action.node_id)
    return named


def apply_actions(state: RolloutState, actions: Iterable[Action]) -> RolloutState:
    """The rollout after `actions` (what the driver then stores, and the simulator keeps)."""
    updates: dict[str, NodeAssignment] = {}  # the nodes' new assignments, in the order they were first written

    def current(node_id: str) -> NodeAssignment:
        assignment = updates.get(node_id)
        return state.nodes[node_id] if assignment is None else assignment

    changes: dict[str, Any] = {}
    regrouped = False
    for action in actions:
        regrouped = regrouped or isinstance(action, Assign | Exclude | Include)
        match action:
            case Assign(node_id, wave, previous, order, excluded):
                updates[node_id] = NodeAssignment(node_id, wave, previous, order, excluded)
            case Exclude(node_id, reason, refused):
                updates[node_id] = replace(current(node_id), excluded=reason, refused=refused)
            case Include(node_id, wave):
                # It starts over in `wave`: one kept out after its release (a pin sent it back) is released with
                # that wave and proves healthy again; its release and health from before the pin would have sent
                # it the version before its wave started, and counted it healthy on the version it left.
                updates[node_id] = replace(
                    current(node_id), excluded=None, wave=wave, released_at=None, healthy_at=None
                )
            case StartWave(wave, at):
                changes.update(wave=wave, wave_started_at=at, message=f"wave {wave + 1} started")
            case Release(node_ids, at):
                for node_id in node_ids:
                    updates[node_id] = replace(current(node_id), released_at=at)
            case MarkHealthy(node_id, at):
                updates[node_id] = replace(current(node_id), healthy_at=at)
            case MarkFailed(node_id, at, reason):
                updates[node_id] = replace(current(node_id), failed_at=at, failure=reason)
            case MarkOnTarget(node_id):
                updates[node_id] = replace(current(node_id), ever_on_target=True)
            case RecordGates(results, baseline):
                changes.update(gate_results=results, baseline=baseline)
            case Halt(gate, rollback, at):
                changes.update(
                    status="rolled_back" if rollback else "paused",
                    failed_gate=gate,
                    finished_at=at if rollback else None,
                    message=f"gate {gate.gate.text} failed in wave {gate.wave + 1}: {gate.detail}",
                )
            case Complete(at, message, took_part):
                changes.update(status="succeeded" if took_part else "aborted", finished_at=at, message=message)
            case Note(message):
                changes.update(message=message)
    nodes = state.nodes
    if updates:
        nodes = dict(state.nodes)
        nodes.update(updates)  # existing nodes keep their place, new ones follow in the order they were assigned
    updated = replace(state, nodes=nodes, **changes)
    index = state.__dict__.get("_index")
    if index is not None and not regrouped:
        # No node joined, left or changed its wave: patch the index (rebuilding it costs a pass over every node).
        updated.__dict__["_index"] = index.patched(updates)
    return updated
