"""The simulator's engine: thousands of virtual nodes, a virtual clock, and the real decision code.

What is real: the control plane's desired-state rule (`strata.control.desired`), its rule of which version may reach
which node and why not (pins, placement policies, hardware profiles) and of what the planner sees of a node
(`strata.control.eligibility_rule`), the rollout planner and its gates (`strata.control.rollout_plan`), and on every
node the agent's `plan(desired, observed, now)`, its slot and failure bookkeeping (`NodeState`), its retry backoff
and its probation judgement. What is simulated: time (an event queue, no sleeping), connectivity (when each node can
reach the control plane), transfers (bytes at the node's bandwidth, resumed after a cut), the outcome of a health
check (the scenario's faults), and the serving counters nodes report (requests at the fleet's rate, the version's
error rate, a p95 latency per hardware profile times the version's latency factor, with a fixed per-node spread).

Version 1 runs everywhere at the start (a deployment to every node) unless a pin of the scenario holds a node on
another version; the rollout leaves pinned nodes out, as the control plane does. A node that is online learns of a
change of its desired state at once (agents long-poll) and reports what it runs after every change; an offline node
keeps serving, keeps judging its probation, and catches up when it returns. The control plane's driver steps the
planner every `server.tick` while the rollout is active.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import math
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from strata.agent.plan import (
    Activate,
    CollectGarbage,
    Download,
    ForgetFailures,
    Observed,
    RecordFailure,
    Stage,
    Unload,
    plan,
    retry_at,
)
from strata.agent.probation import ProbationConfig, judge
from strata.agent.state import FailureRecord, NodeState, ProbationRecord, SlotRef
from strata.control.desired import desired_state
from strata.control.eligibility_rule import ActiveDeployment, FleetNode, Release, exclusion, observe
from strata.control.gates import merge_gates, parse_gate
from strata.control.rollout_plan import (
    ACTIVE,
    NodeObservation,
    RolloutSpec,
    RolloutState,
    apply_actions,
    named_nodes,
    next_due,
    parse_waves,
    plan_rollout,
)
from strata.core.errors import ConfigError
from strata.core.policy import NodeFacts
from strata.core.profiles import Profile, VariantChoice, get_profile, rank_variants
from strata.core.wire import (
    DesiredState,
    ModelStatus,
    NodeStatus,
    ProbationState,
    ServingCounters,
    Tier,
    VariantRef,
    tier_of,
)
from strata.sim.scenario import Connectivity, NodeSpec, Scenario

# A typical p95 compute latency (ms) of a small model per hardware profile: what baselines are made of.
BASE_LATENCY_MS: Final = {
    "cpu-generic": 9.0,
    "x86_64-avx2": 4.0,
    "x86_64-avx512-vnni": 3.0,
    "x86_64-avx512-bf16": 2.8,
    "intel-openvino": 2.5,
    "arm64-neon": 11.0,
    "arm64-neon-dotprod": 7.0,
    "jetson-cuda": 2.0,
    "x86_64-cuda": 1.0,
}
GRACE_S: Final = 3600.0  # a node counts as reachable if it was online this long before the horizon, or earlier
FULL_REFRESH_S: Final = 600.0  # serving counters the planner sees are at most this old

_ONLINE, _OFFLINE, _SYNC, _DOWNLOADED, _PROBATION, _TICK, _START = range(7)


def _hash01(*parts: object) -> float:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@contextlib.contextmanager
def _cycle_collector_paused() -> Iterator[None]:
    """A run makes no reference cycles (what it drops, reference counting frees), while the cycle collector's
    passes over its millions of live objects take a third of a 100,000-node run: it is paused meanwhile."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, weights=[weights[n] for n in names])[0]


@dataclass(eq=False)
class SimNode:
    """One virtual node: what it is, how it connects, what its agent holds, and what the server last heard."""

    index: int
    node_id: str
    model: str
    profile: Profile
    tier: Tier
    labels: dict[str, str]
    connectivity: Connectivity
    bandwidth: float
    latency_noise: float
    facts: NodeFacts
    online: bool = False
    lost: bool = False
    state: NodeState = field(default_factory=NodeState)
    staged: set[str] = field(default_factory=set)
    downloaded: set[str] = field(default_factory=set)
    partial: dict[str, float] = field(default_factory=dict)
    downloading: tuple[VariantRef, float] | None = None
    download_token: int = 0
    lose_at: float | None = None
    retry_sync_at: float = math.inf
    idle: bool = False  # its last round ended with nothing to do, and nothing changed for it since
    spread: dict[str, float] = field(default_factory=dict)
    ever: set[str] = field(default_factory=set)
    changed_at: float = 0.0
    offline_since: float = 0.0
    reached_at: float | None = None  # first time online after the rollout finished
    # the control plane's view, from the node's last report
    reported: SlotRef | None = None
    reported_probation: ProbationState | None = None
    reported_failures: tuple[FailureRecord, ...] = ()
    # its desired state, and the rollout entry it was decided with (the rule is pure: the same entry, the same state)
    desired: tuple[ActiveDeployment | None, DesiredState] | None = None

    @property
    def active_version(self) -> str | None:
        slots = self.state.models.get(self.model)
        return slots.active.version if slots else None

    def fleet_node(self, status: NodeStatus | None = None) -> FleetNode:
        """The node as the control plane's rules see it (`strata.control.eligibility_rule`)."""
        online = self.online and not self.lost
        return FleetNode(self.node_id, self.node_id, self.labels, self.facts, status, online)


@dataclass
class Summary:
    """What a run came to (the JSON `strata sim --json` prints)."""

    values: dict[str, Any]


class Simulation:
    """One run of a scenario over `nodes` virtual nodes, seeded (see `run`)."""

    def __init__(self, scenario: Scenario, nodes: int | None = None, seed: int | None = None) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.rng = random.Random(self.seed)
        self.count = nodes or scenario.nodes
        self.now = 0.0
        self.queue: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self.events = 0
        self.planner_runs = 0
        self.bytes_downloaded = 0.0
        self.probation = ProbationConfig(duration_s=scenario.probation_s)
        rate = scenario.requests_per_hour / 3600.0
        self.rate_per_s = rate
        self.model = scenario.model
        self.releases = {v: self._release(v) for v in scenario.versions}
        self.base = self.releases["1"].entry(1, 0.0)
        self.pins = tuple(
            self.releases[pin.version].entry(
                number,
                0.0,
                pin.selector,
                kind="pin",
                only_nodes=None if pin.node is None else frozenset({pin.node}),
            )
            for number, pin in enumerate(scenario.pins, 1)
        )
        if scenario.fleet_nodes and self.count != len(scenario.fleet_nodes):
            listed = len(scenario.fleet_nodes)
            raise ConfigError(f"scenario {scenario.name} lists its {listed} nodes: it cannot run with {self.count}")
        target = scenario.rollout.version
        self.target = target
        self.target_bad = scenario.versions[target].bad
        self.rollout: RolloutState | None = None
        self.rollout_entry: ActiveDeployment | None = None
        self.rollout_started_at: float | None = None
        self.finished_at: float | None = None
        self.first_wave: frozenset[str] = frozenset()
        self.stale: set[int] = set()  # nodes whose observation must be rebuilt
        self.reported = False  # a status report changed since the planner last ran
        self.observations: dict[str, NodeObservation] = {}
        self.named: set[str] = set()  # the nodes the planner's last actions named
        # Every released node whose observation may show fewer requests than it takes to judge it (a superset:
        # those whose observation changed, or that were released, since the last refresh; see `_plan`).
        self.young: set[str] = set()
        self.last_full = -math.inf
        self.next_due = math.inf
        with _cycle_collector_paused():
            self.nodes = [self._make_node(i) for i in range(self.count)]
        self.by_id = {node.node_id: node for node in self.nodes}
        # Why the rollout may not reach each node, as the control plane words it: fixed for a run (its pins,
        # policies and nodes do not change), so decided once.
        target_release = self.releases[target]
        self._exclusions = {
            node.node_id: exclusion(node.fleet_node(), target_release, self.pins) for node in self.nodes
        }

    # --- setting up -------------------------------------------------------------------------------------

    def _variants(self, version: str) -> tuple[VariantRef, ...]:
        refs = []
        for profile in self.scenario.variants:
            digest = hashlib.sha256(f"{self.scenario.model}:{version}:{profile}".encode()).hexdigest()
            blob = hashlib.sha256(f"blob:{self.scenario.model}:{version}:{profile}".encode()).hexdigest()
            refs.append(
                VariantRef(
                    id=f"{profile}-fp32",
                    profile=profile,
                    runtime="onnxruntime",
                    precision="fp32",
                    digest="sha256:" + digest,
                    blob=blob,
                    size=int(self.scenario.model_size),
                )
            )
        return tuple(refs)

    def _release(self, version: str) -> Release:
        variants = self._variants(version)
        policy = self.scenario.policy
        return Release(self.model, version, variants, {} if policy.empty else {v.id: policy for v in variants})

    def _make_node(self, index: int) -> SimNode:
        rng = self.rng
        scenario = self.scenario
        spec: NodeSpec | None = scenario.fleet_nodes[index] if scenario.fleet_nodes else None
        if spec is None:
            profile = get_profile(_pick(rng, scenario.profiles))
            tier = _pick(rng, scenario.tiers)
            region = _pick(rng, scenario.regions)
            node_id = f"node-{index:05d}"
            labels = {"region": region, "tier": tier, "site": f"site-{index // 20:04d}"}
        else:
            profile, tier, node_id, labels = get_profile(spec.profile), spec.tier, spec.name, dict(spec.labels)
        shares = {str(i): c.share for i, c in enumerate(scenario.connectivity)}
        connectivity = scenario.connectivity[int(_pick(rng, shares))]
        low, high = math.log(scenario.bandwidth_min), math.log(scenario.bandwidth_max)
        node = SimNode(
            index=index,
            node_id=node_id,
            model=self.model,
            profile=profile,
            tier=tier_of(tier),
            labels=labels,
            connectivity=connectivity,
            bandwidth=math.exp(rng.uniform(low, high)),
            latency_noise=math.exp(rng.gauss(0.0, 0.1)),
            facts=NodeFacts.of(node_id, tier, profile.id, labels),
        )
        # Every node runs version 1 at the start (or what a pin holds it on), as if deployed long ago (and its
        # probation passed).
        desired = desired_state(node.node_id, node.labels, False, [self.base, *self.pins], node.facts)
        model = desired.model(self.model)
        if model is not None:
            choices = [VariantChoice(v.id, v.profile, v.runtime, v.precision) for v in model.variants]
            ranked = rank_variants(profile, choices)
            if ranked:
                ref = next(v for v in model.variants if v.id == ranked[0].id)
                slot = SlotRef(ref.digest, model.version, ref.id, -86400.0)
                node.state = node.state.with_active(self.model, slot)
                node.staged.add(ref.digest)
                node.ever.add(model.version)
        slots = node.state.models.get(self.model)
        node.reported = slots.active if slots else None
        node.reported_probation = "passed" if node.reported else None
        self._start_connectivity(node)
        return node

    # --- connectivity -----------------------------------------------------------------------------------

    def _push(self, at: float, kind: int, node: int = -1, token: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (at, self._seq, kind, node, token))

    def _start_connectivity(self, node: SimNode) -> None:
        spec = node.connectivity
        rng = self.rng
        if spec.model == "always":
            node.online = True
        elif spec.model == "flaky":
            node.online = rng.random() < spec.online
            self._push(self._flaky_spell(node), _OFFLINE if node.online else _ONLINE, node.index)
        elif spec.model == "daily_window":
            node.online = False
            self._push(spec.start_s + rng.uniform(0, spec.spread_s), _ONLINE, node.index)
        elif spec.model == "offline_for_days":
            node.online = False
            self._push(spec.days * 86400.0 * rng.uniform(0.5, 1.5), _ONLINE, node.index)

    def _flaky_spell(self, node: SimNode) -> float:
        spec = node.connectivity
        mean_on = spec.session_s
        mean_off = mean_on * (1 - spec.online) / spec.online if spec.online < 1 else math.inf
        mean = mean_on if node.online else mean_off
        return self.now + (self.rng.expovariate(1 / mean) if math.isfinite(mean) else math.inf)

    def _go_online(self, node: SimNode) -> None:
        if node.lost:
            return
        node.online = True
        if self.finished_at is not None and node.reached_at is None:
            node.reached_at = self.now
        spec = node.connectivity
        if spec.model == "flaky":
            self._push(self._flaky_spell(node), _OFFLINE, node.index)
        elif spec.model == "daily_window":
            self._push(self.now + spec.length_s, _OFFLINE, node.index)
        self.stale.add(node.index)
        # An idle node's round would plan nothing (`plan` is a pure function of the same inputs): skip it.
        if not node.idle:
            self._sync(node)

    def _go_offline(self, node: SimNode) -> None:
        if not node.online:
            return
        node.online = False
        node.offline_since = self.now
        self._pause_download(node)
        # The control plane sees a lost node go offline too: it stops holding its wave at the deadline (one it
        # still took for online would hold its wave for good, as a node online and updating does).
        self.stale.add(node.index)
        spec = node.connectivity
        if node.lost:
            return
        if spec.model == "flaky":
            self._push(self._flaky_spell(node), _ONLINE, node.index)
        elif spec.model == "daily_window":
            self._push(self.now + 86400.0 - spec.length_s, _ONLINE, node.index)

    # --- the node's agent -------------------------------------------------------------------------------

    def _observed(self, node: SimNode) -> Observed:
        return Observed(
            profile=node.profile,
            runtimes=frozenset(node.profile.runtimes),
            slots=node.state.models,
            staged=frozenset(node.staged),
            downloaded=frozenset(node.downloaded),
            failures=node.state.failures,
        )

    def _desired(self, node: SimNode) -> DesiredState:
        entry = self.rollout_entry
        if node.desired is None or node.desired[0] is not entry:
            entries = [self.base, *self.pins] if entry is None else [self.base, *self.pins, entry]
            node.desired = (entry, desired_state(node.node_id, node.labels, False, entries, node.facts))
        return node.desired[1]

    def _sync(self, node: SimNode) -> None:
        """The agent's round: take the desired state, plan and act until it must wait, then report."""
        if not node.online or node.lost:
            return
        desired = self._desired(node)
        node.idle = False
        for _ in range(32):
            actions = plan(desired, self._observed(node), self.now)
            if not actions:
                node.idle = not node.state.failures and node.downloading is None
                break
            action = actions[0]
            if isinstance(action, Download):
                self._start_download(node, action.variant)
                break
            if isinstance(action, Stage):
                node.downloaded.discard(action.variant.blob)
                node.staged.add(action.variant.digest)
            elif isinstance(action, Activate):
                self._activate(node, action.version, action.variant)
            elif isinstance(action, Unload):
                node.state = node.state.without_model(action.model)
                self._changed(node)
            elif isinstance(action, RecordFailure):
                record = FailureRecord(action.model, action.version, None, action.reason, self.now, 1, "no-variant")
                node.state = node.state.with_failure(action.key, record)
            elif isinstance(action, ForgetFailures):
                node.state = node.state.without_failures(set(action.keys))
            elif isinstance(action, CollectGarbage):
                node.staged &= action.keep
                node.downloaded &= action.keep_blobs
                node.partial = {b: n for b, n in node.partial.items() if b in action.keep_blobs}
        self._report(node)
        # Waiting out a failure's backoff: the agent shortens its poll to wake when the retry is due.
        retries = [retry_at(r) for r in node.state.failures.values() if retry_at(r) > self.now]
        if retries and min(retries) != node.retry_sync_at:
            node.retry_sync_at = min(retries)
            self._push(node.retry_sync_at, _SYNC, node.index)

    def _start_download(self, node: SimNode, variant: VariantRef) -> None:
        if node.downloading is not None and node.downloading[0].blob == variant.blob:
            return
        self._pause_download(node)
        node.download_token += 1
        node.downloading = (variant, self.now)
        remaining = max(0.0, variant.size - node.partial.get(variant.blob, 0.0))
        if (
            node.lose_at is None
            and self.scenario.lost_during_update > 0
            and variant.digest in {v.digest for v in self.releases[self.target].variants}
            and self.rng.random() < self.scenario.lost_during_update
        ):
            node.lose_at = self.now + self.rng.uniform(0, remaining / node.bandwidth)
            self._push(node.lose_at, _OFFLINE, node.index, -1)
        self._push(self.now + remaining / node.bandwidth, _DOWNLOADED, node.index, node.download_token)

    def _pause_download(self, node: SimNode) -> None:
        if node.downloading is None:
            return
        variant, started = node.downloading
        got = min(variant.size - node.partial.get(variant.blob, 0.0), (self.now - started) * node.bandwidth)
        node.partial[variant.blob] = node.partial.get(variant.blob, 0.0) + got
        self.bytes_downloaded += got
        node.downloading = None
        node.download_token += 1

    def _download_done(self, node: SimNode) -> None:
        assert node.downloading is not None
        variant, _ = node.downloading
        self.bytes_downloaded += variant.size - node.partial.get(variant.blob, 0.0)
        node.partial.pop(variant.blob, None)
        node.downloading = None
        node.downloaded.add(variant.blob)
        self._sync(node)

    def _counters(self, node: SimNode, version: str, since: float, until: float) -> ServingCounters:
        faults = self.scenario.versions.get(version)
        factor = faults.latency_factor if faults else 1.0
        error_rate = faults.error_rate if faults else 0.0
        requests = int(self.rate_per_s * max(0.0, until - since))
        spread = node.spread.get(version)
        if spread is None:
            spread = node.spread[version] = math.exp(0.03 * (2 * _hash01(self.seed, node.node_id, version) - 1))
        p95 = BASE_LATENCY_MS.get(node.profile.id, 5.0) * factor * node.latency_noise * spread
        return ServingCounters(
            requests=requests,
            errors=min(requests, int(requests * error_rate + 0.5)),
            latency_p95_ms=round(p95, 4) if requests else None,
            since=since,
        )

    def _activate(self, node: SimNode, version: str, variant: VariantRef) -> None:
        faults = self.scenario.versions.get(version)
        if faults is not None and node.profile.id in faults.fails_on_profiles:
            previous = node.state.failures.get(variant.digest)
            attempts = previous.attempts + 1 if previous else 1
            reason = f"health check failed: golden outputs differ on {node.profile.id}"
            failure = FailureRecord(self.model, version, variant.id, reason, self.now, attempts, "health")
            node.state = node.state.with_failure(variant.digest, failure)
            return
        current = node.state.models.get(self.model)
        reference = None
        if current is not None and current.active.digest != variant.digest:
            reference = self._counters(node, current.active.version, -3600.0, 0.0).latency_p95_ms
        node.state = node.state.with_active(self.model, SlotRef(variant.digest, version, variant.id, self.now))
        if self.probation.enabled:
            record = ProbationRecord(version, variant.digest, self.now, reference, "previous version on this node")
            node.state = node.state.with_probation(self.model, record)
            self._push(self.now + self.probation.duration_s, _PROBATION, node.index)
        self._changed(node)

    def _judge_probation(self, node: SimNode) -> None:
        record = node.state.probation.get(self.model)
        slots = node.state.models.get(self.model)
        if record is None or slots is None or slots.active.digest != record.digest:
            return
        counters = self._counters(node, record.version, record.started_at, self.now)
        verdict = judge(record, counters, self.probation, self.now - record.started_at)
        if verdict.outcome == "running":
            self._push(self.now + self.probation.check_interval_s, _PROBATION, node.index)
            return
        node.idle = False
        if verdict.outcome == "passed":
            node.state = node.state.without_probation(self.model)
        else:
            state = (
                node.state.rolled_back(self.model)
                if slots.previous is not None
                else node.state.without_model(self.model)
            )
            old = state.failures.get(record.digest)
            failure = FailureRecord(
                self.model,
                record.version,
                slots.active.variant,
                f"probation failed: {verdict.reason}",
                self.now,
                old.attempts + 1 if old else 1,
                "probation",
            )
            node.state = state.with_failure(record.digest, failure)
            self._changed(node)
        if node.online:
            self._sync(node)

    def _changed(self, node: SimNode) -> None:
        version = node.active_version
        if version is not None:
            node.ever.add(version)
        node.changed_at = self.now

    def _report(self, node: SimNode) -> None:
        """What the node's status report tells the control plane (sent after every round)."""
        slots = node.state.models.get(self.model)
        active = slots.active if slots else None
        probation: ProbationState | None = None
        if slots:
            probation = "running" if self.model in node.state.probation else "passed"
        failures = tuple(node.state.failures.values())
        if (active, probation, failures) != (node.reported, node.reported_probation, node.reported_failures):
            node.reported, node.reported_probation, node.reported_failures = active, probation, failures
            self.stale.add(node.index)
            self.reported = True

    # --- the control plane ------------------------------------------------------------------------------

    def _observe(self, node: SimNode, rollout: RolloutState) -> NodeObservation:
        """What the rollout planner sees of the node: its last report, with the serving counters it has sent since,
        taken as the control plane takes it (`strata.control.eligibility_rule.observe`)."""
        slot = node.reported
        models: tuple[ModelStatus, ...] = ()
        if slot is not None:
            seen = self.now if node.online else node.offline_since
            serving = self._counters(node, slot.version, slot.activated_at, seen)
            probation = node.reported_probation
            version, variant, digest, since = slot.version, slot.variant, slot.digest, slot.activated_at
            models = (ModelStatus(self.model, version, variant, digest, since, serving=serving, probation=probation),)
        status = NodeStatus(node.tier, node.labels, node.profile.id, False, "sim", models, node.reported_failures)
        return observe(node.fleet_node(status), rollout, self._exclusions[node.node_id], None)

    def _start_rollout(self) -> None:
        plan_spec = self.scenario.rollout
        spec = RolloutSpec(
            waves=parse_waves(plan_spec.waves),
            max_unavailable=plan_spec.max_unavailable,
            bake_s=plan_spec.bake_s,
            gates=merge_gates(parse_gate(g) for g in plan_spec.gates),
            on_failure=plan_spec.on_failure,
            wave_deadline_s=plan_spec.wave_deadline_s,
            min_requests=plan_spec.min_requests,
            on_no_data=plan_spec.on_no_data,
        )
        self.rollout = RolloutState(
            id=1, model=self.model, version=self.target, selector={}, spec=spec, created_at=self.now
        )
        self.rollout_started_at = self.now
        self._tick()

    def _entry(self, state: RolloutState) -> ActiveDeployment | None:
        if state.status in ("rolled_back", "aborted"):
            return None
        only_nodes = None if state.status == "succeeded" else state.released
        release = self.releases[state.version]
        return release.entry(state.id, state.created_at, state.selector, kind="rollout", only_nodes=only_nodes)

    def _tick(self) -> None:
        state = self.rollout
        if state is None or state.status not in ACTIVE:
            return
        # The driver steps when a report changed something, when a bake or deadline is due, and now and then so
        # that the serving counters it judges are fresh.
        if self.reported or self.now >= self.next_due or self.now - self.last_full >= FULL_REFRESH_S:
            self._plan()
        if self.rollout is not None and self.rollout.status in ACTIVE:
            self._push(self.now + self.scenario.tick_s, _TICK)

    def _plan(self) -> None:
        state = self.rollout
        assert state is not None
        first = not self.observations
        if first:
            self.observations = {node.node_id: self._observe(node, state) for node in self.nodes}
            self.young.update(self.observations)
        if self.now - self.last_full >= FULL_REFRESH_S:
            # Counters grow on the nodes running the new version. The simulated rates are steady, so once a node
            # has served enough requests to be judged its figures no longer move: only younger ones are refreshed.
            enough = 2 * state.spec.min_requests
            young = set()
            for node_id in self.young:
                if node_id in state.released:
                    serving = self.observations[node_id].serving
                    if serving is None or serving.requests < enough:
                        self.stale.add(self.by_id[node_id].index)
                        young.add(node_id)
            self.young = young
            self.last_full = self.now
        changed = set(self.named)  # the planner looks again only at these nodes (the rest would give no action)
        for index in self.stale:
            node = self.nodes[index]
            self.observations[node.node_id] = self._observe(node, state)
            changed.add(node.node_id)
        self.young |= changed
        self.stale.clear()
        self.reported = False
        self.planner_runs += 1
        actions = plan_rollout(state, self.observations, self.now, None if first else changed)
        new = apply_actions(state, actions) if actions else state
        self.named = named_nodes(actions)
        self.rollout = new
        if not self.first_wave and new.wave_started_at is not None:
            self.first_wave = frozenset(a.node_id for a in new.members(0))
        self.next_due = self._next_due(new)
        released_changed = new.released is not state.released and new.released != state.released
        if released_changed:
            self.young |= new.released - state.released
        if new.status != state.status or released_changed or self.rollout_entry is None:
            self.rollout_entry = self._entry(new)
            if new.status != state.status:
                touched = [n for n in self.nodes if n.node_id in new.nodes]
                if new.status not in ACTIVE:
                    self.finished_at = self.now
                    for node in self.nodes:
                        if node.online and not node.lost:
                            node.reached_at = self.now
            else:
                # In node order: a set of ids iterates in an order that changes with the process's hash seed, and
                # the order of these wake-ups decides which node draws which random number (a lost node, say).
                touched = sorted((self.by_id[n] for n in new.released - state.released), key=lambda n: n.index)
            for node in touched:  # online nodes hear of a changed desired state at once (long poll)
                node.idle = False
                if node.online:
                    self._push(self.now, _SYNC, node.index)

    def _next_due(self, state: RolloutState) -> float:
        """The next time the rollout could move without any node reporting: a bake ending, a deadline passing."""
        due = next_due(state, self.now)
        return due if due > self.now else self.now + self.scenario.tick_s

    # --- running ----------------------------------------------------------------------------------------

    def run(self) -> Summary:
        """Run to the horizon; return the summary."""
        with _cycle_collector_paused():
            return self._run()

    def _run(self) -> Summary:
        started = time.perf_counter()
        self._push(self.scenario.rollout.start_s, _START)
        horizon = self.scenario.horizon_s
        nodes, queue, pop = self.nodes, self.queue, heapq.heappop
        while queue and queue[0][0] <= horizon:
            at, _, kind, index, token = pop(queue)
            self.now = at
            self.events += 1
            if kind == _TICK:
                self._tick()
                continue
            if kind == _START:
                self._start_rollout()
                continue
            node = nodes[index]
            if kind == _ONLINE:
                if not node.online:
                    self._go_online(node)
            elif kind == _OFFLINE:
                if token == -1:  # lost for good, in the middle of an update
                    if node.online:
                        node.lost = True
                        self._go_offline(node)
                    node.lost = True
                else:
                    self._go_offline(node)
            elif kind == _SYNC:
                if at == node.retry_sync_at:
                    node.retry_sync_at = math.inf
                if node.online:
                    self._sync(node)
            elif kind == _DOWNLOADED:
                if token == node.download_token and node.downloading is not None and node.online:
                    self._download_done(node)
            elif kind == _PROBATION:
                self._judge_probation(node)
        self.now = horizon
        wall = time.perf_counter() - started
        return self._summary(wall)

    def _summary(self, wall: float) -> Summary:
        state = self.rollout
        finished = self.finished_at
        reachable = converged = lost = 0
        last_change = 0.0
        end_versions: dict[str, int] = {}
        for node in self.nodes:
            version = node.active_version or "none"
            end_versions[version] = end_versions.get(version, 0) + 1
            if node.lost:
                lost += 1
                continue
            # Reachable: online after the rollout finished, early enough before the horizon to have caught up.
            if node.reached_at is None or node.reached_at > self.now - GRACE_S:
                continue
            reachable += 1
            want = self._desired(node).model(self.model)
            if want is not None and node.active_version == want.version:
                converged += 1
                last_change = max(last_change, node.changed_at)
        started = self.rollout_started_at
        ever_target = sum(1 for node in self.nodes if self.target in node.ever)
        back_on_old = sum(1 for node in self.nodes if self.target in node.ever and node.active_version != self.target)
        virtual = self.now
        values: dict[str, Any] = {
            "scenario": self.scenario.name,
            "nodes": self.count,
            "seed": self.seed,
            "virtual_s": virtual,
            "rollout_status": state.status if state else "not started",
            "waves_started": (state.wave + 1) if state and state.wave_started_at is not None else 0,
            "first_wave_nodes": len(self.first_wave),
            "failed_gate": state.failed_gate.to_json() if state and state.failed_gate else None,
            "rolled_back": bool(state and state.status == "rolled_back"),
            "nodes_ever_on_bad_version": ever_target if self.target_bad else 0,
            "nodes_ever_on_new_version": ever_target,
            "nodes_back_on_old_version": back_on_old,
            "reachable_nodes": reachable,
            "converged_nodes": converged,
            "converged_fraction": round(converged / reachable, 6) if reachable else 0.0,
            "time_to_finish_s": (finished - started) if finished is not None and started is not None else None,
            "time_to_converge_s": (
                max(0.0, last_change - started)
                if started is not None and reachable and converged == reachable
                else None
            ),
            "lost_nodes": lost,
            "versions_at_end": dict(sorted(end_versions.items())),
            "bytes_downloaded": round(self.bytes_downloaded),  # a float sum of partial transfers: 79999999999.99998
            "planner_runs": self.planner_runs,
            "events": self.events,
            "wall_s": round(wall, 3),
            "virtual_node_hours_per_s": round(self.count * virtual / 3600 / wall, 1) if wall > 0 else None,
            "message": state.message if state else "",
        }
        return Summary(values)


def run_scenario(scenario: Scenario, nodes: int | None = None, seed: int | None = None) -> dict[str, Any]:
    """Simulate `scenario` (with `nodes` virtual nodes and `seed` when given) and return its JSON summary."""
    with _cycle_collector_paused():  # and the simulation freed before it runs again, not looked through first
        return Simulation(scenario, nodes, seed).run().values
