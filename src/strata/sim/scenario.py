"""Simulator scenarios: a YAML file that describes a fleet, a model's versions (with the faults to inject) and
the rollout to run. Every field has a default, so a scenario states only what it is about:

    name: bad-canary
    nodes: 2000                    # `strata sim --nodes` overrides it
    horizon: 2d                    # virtual time simulated
    fleet:
      profiles: {x86_64-avx2: 4, arm64-neon: 3, arm64-neon-dotprod: 2, jetson-cuda: 1}   # weights
      tiers: {device: 4, near-edge: 1}
      regions: {eu-west: 2, us-east: 2, ap-south: 1}
      connectivity:                # shares of the fleet, each with its model
        - {model: always, share: 0.7}
        - {model: flaky, share: 0.3, online: 0.5, session: 40m}
        - {model: daily_window, share: 0, start: 1h, length: 3h, spread: 2h}
        - {model: offline_for_days, share: 0, days: 2}
      bandwidth: {min: 200KB/s, max: 5MB/s}
      requests_per_hour: 600
      nodes:                       # optional: these nodes instead of a drawn fleet (a node's name is its id)
        - {name: lab-1, profile: x86_64-avx2, tier: device, labels: {region: eu-west}}
    model:
      name: digits
      size: 8MB
      variants: [cpu-generic, x86_64-avx2, arm64-neon]
      policy: {allowed_regions: ["eu-*"]}        # optional placement policy of every version
    versions:
      "2": {fails_on_profiles: [arm64-neon-dotprod], latency_factor: 1.0, error_rate: 0.0}
    rollout: {version: "2", start: 30m, waves: "1%,10%,50%,100%", bake: 30m, wave_deadline: 2h, gates: [],
              on_no_data: hold}               # a gate without enough data: hold (until the deadline), pass, fail
    pins:                          # as `strata pin` makes them: one node, or the nodes a selector matches
      - {version: "1", node: lab-1}
    faults:
      lost_during_update: 0.0      # share of nodes that vanish for good while downloading the new version
    agent: {probation: 60s}
    server: {tick: 1m}

Version "1" is what every node runs at the start (deployed to the whole fleet, where no pin says otherwise); the
rollout takes "2" out. Pins and policies decide as they do in the control plane (`strata.control.eligibility_rule`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from strata.control.gates import check_no_data_policy, parse_gate
from strata.control.rollout_plan import parse_waves
from strata.core.errors import ConfigError, ProfileError
from strata.core.policy import Policy, PolicyError
from strata.core.profiles import get_profile
from strata.core.wire import TIERS, ProtocolError, parse_labels
from strata.core.words import parse_duration

CONNECTIVITY_MODELS: Final = ("always", "flaky", "daily_window", "offline_for_days")
_UNITS_B: Final = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
# The keys each part of a scenario file may have (anything else is refused, not ignored).
SCENARIO_KEYS: Final = frozenset(
    {"name", "description", "nodes", "horizon", "seed", "fleet", "model", "rollout", "faults", "agent", "server"}
    | {"versions", "pins"}
)
SECTION_KEYS: Final = {
    "fleet": frozenset({"profiles", "tiers", "regions", "connectivity", "bandwidth", "requests_per_hour", "nodes"}),
    "model": frozenset({"name", "size", "variants", "policy"}),
    "rollout": frozenset(
        {"version", "start", "waves", "bake", "wave_deadline", "max_unavailable", "gates", "on_failure"}
        | {"min_requests", "on_no_data"}
    ),
    "faults": frozenset({"lost_during_update"}),
    "agent": frozenset({"probation"}),
    "server": frozenset({"tick"}),
}
CONNECTIVITY_KEYS: Final = frozenset({"model", "share", "online", "session", "start", "length", "spread", "days"})
VERSION_KEYS: Final = frozenset({"fails_on_profiles", "latency_factor", "error_rate"})
NODE_KEYS: Final = frozenset({"name", "tier", "profile", "labels"})
PIN_KEYS: Final = frozenset({"version", "node", "selector"})


def duration(value: Any, what: str) -> float:
    """`90`, `90s`, `10m`, `2h`, `3d` -> seconds, read as the CLI reads a duration (`strata.core.words`).

    Raises:
        ConfigError: not a non-negative duration.
    """
    try:
        seconds = parse_duration(str(value))  # a YAML number as well: its text is a duration in seconds
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if seconds < 0:
        raise ConfigError(f"{what}: must not be negative")
    return seconds


def size(value: Any, what: str) -> float:
    """`8MB`, `200KB/s`, `1024` -> bytes (per second, for rates).

    Raises:
        ConfigError: not a positive size.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        amount = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?i?b)?\s*(/s)?\s*", str(value).lower())
        if match is None:
            raise ConfigError(f"{what}: {value!r} is not a size (512KB, 8MB, 200KB/s)")
        amount = float(match.group(1)) * _UNITS_B[match.group(2) or "b"]
    if amount <= 0:
        raise ConfigError(f"{what}: must be positive")
    return amount


def _weights(raw: Any, what: str, default: Mapping[str, float]) -> dict[str, float]:
    if raw is None:
        return dict(default)
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{what} must map names to weights")
    weights = {}
    for name, weight in raw.items():
        if not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"{what}: weight of {name!r} must be a non-negative number")
        weights[str(name)] = float(weight)
    if not sum(weights.values()):
        raise ConfigError(f"{what}: the weights add up to zero")
    return weights


@dataclass(frozen=True)
class Connectivity:
    """A share of the fleet and how its nodes reach the control plane."""

    model: str
    share: float
    online: float = 0.5  # flaky: the fraction of time online
    session_s: float = 2400.0  # flaky: mean length of an online spell
    start_s: float = 3600.0  # daily_window: when the window opens (after midnight)
    length_s: float = 3 * 3600.0  # daily_window: how long it stays open
    spread_s: float = 2 * 3600.0  # daily_window: nodes open their window up to this much later
    days: float = 2.0  # offline_for_days: gone this long from the start (each node 0.5x to 1.5x it)

    @classmethod
    def from_json(cls, raw: Any) -> Connectivity:
        """Raises:
        ConfigError: an unknown model or out-of-range numbers.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError("each fleet.connectivity entry must be a mapping")
        _known_keys(raw, CONNECTIVITY_KEYS, "a fleet.connectivity entry")
        model = str(raw.get("model", ""))
        if model not in CONNECTIVITY_MODELS:
            raise ConfigError(f"connectivity model {model!r} is not one of {list(CONNECTIVITY_MODELS)}")
        entry = cls(
            model=model,
            share=float(raw.get("share", 0)),
            online=float(raw.get("online", 0.5)),
            session_s=duration(raw.get("session", 2400), "connectivity session"),
            start_s=duration(raw.get("start", 3600), "connectivity start"),
            length_s=duration(raw.get("length", 3 * 3600), "connectivity length"),
            spread_s=duration(raw.get("spread", 2 * 3600), "connectivity spread"),
            days=float(raw.get("days", 2.0)),
        )
        if entry.share < 0 or not 0 < entry.online <= 1 or entry.session_s <= 0 or entry.days < 0:
            raise ConfigError(f"connectivity {model}: share >= 0, 0 < online <= 1, session > 0, days >= 0")
        return entry


@dataclass(frozen=True)
class VersionFaults:
    """What is wrong with a version: failing health checks on some profiles, slower, or erring."""

    fails_on_profiles: frozenset[str] = frozenset()
    latency_factor: float = 1.0
    error_rate: float = 0.0

    @property
    def bad(self) -> bool:
        return bool(self.fails_on_profiles) or self.latency_factor > 1.2 or self.error_rate > 0.01

    @classmethod
    def from_json(cls, raw: Any) -> VersionFaults:
        """Raises:
        ConfigError: an unknown profile or out-of-range numbers.
        """
        raw = raw or {}
        if not isinstance(raw, Mapping):
            raise ConfigError("each version must be a mapping of its faults")
        _known_keys(raw, VERSION_KEYS, "a versions entry")
        profiles = raw.get("fails_on_profiles") or []
        for profile in profiles:
            try:
                get_profile(str(profile))
            except ProfileError as exc:
                raise ConfigError(str(exc)) from None
        faults = cls(
            fails_on_profiles=frozenset(str(p) for p in profiles),
            latency_factor=float(raw.get("latency_factor", 1.0)),
            error_rate=float(raw.get("error_rate", 0.0)),
        )
        if faults.latency_factor <= 0 or not 0 <= faults.error_rate <= 1:
            raise ConfigError("latency_factor must be positive and error_rate in [0, 1]")
        return faults


def _profile(value: Any, what: str) -> str:
    """A known hardware profile's id.

    Raises:
        ConfigError: not one.
    """
    try:
        return get_profile(str(value)).id
    except ProfileError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _labels(raw: Any, what: str) -> dict[str, str]:
    """Raises:
    ConfigError: not a mapping of label names to values.
    """
    try:
        return parse_labels(raw or {}, what)
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class NodeSpec:
    """One node of a fleet the scenario lists instead of drawing (its name is its node id)."""

    name: str
    profile: str
    tier: str = "device"
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> NodeSpec:
        """Raises:
        ConfigError: no name, an unknown profile or tier, or malformed labels.
        """
        if not isinstance(raw, Mapping) or not raw.get("name"):
            raise ConfigError("each fleet.nodes entry must be a mapping with a 'name'")
        name = str(raw["name"])
        _known_keys(raw, NODE_KEYS, f"fleet node {name}")
        tier = str(raw.get("tier", "device"))
        if tier not in TIERS:
            raise ConfigError(f"fleet node {name}: tier {tier!r} is not one of {list(TIERS)}")
        profile = _profile(raw.get("profile", ""), f"fleet node {name}")
        return cls(
            name=name, profile=profile, tier=tier, labels=_labels(raw.get("labels"), f"fleet node {name} labels")
        )


@dataclass(frozen=True)
class PinSpec:
    """A pin, as `strata pin` makes one: `node` (a node's name), or the nodes `selector` matches, stay on `version`."""

    version: str
    node: str | None = None
    selector: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: Any) -> PinSpec:
        """Raises:
        ConfigError: no version, or not exactly one of a node and a non-empty selector.
        """
        if not isinstance(raw, Mapping) or raw.get("version") is None:
            raise ConfigError("each pins entry must be a mapping with a 'version'")
        _known_keys(raw, PIN_KEYS, "a pin")
        node = raw.get("node")
        selector = _labels(raw.get("selector"), "pin selector")
        if (node is None) == (not selector):
            raise ConfigError("a pin names one node or a non-empty label selector, not both and not neither")
        return cls(version=str(raw["version"]), node=None if node is None else str(node), selector=selector)


@dataclass(frozen=True)
class RolloutPlan:
    """The rollout the scenario runs (as `strata rollout create` would be given it)."""

    version: str = "2"
    start_s: float = 1800.0
    waves: str = "1%,10%,50%,100%"
    bake_s: float = 1800.0
    wave_deadline_s: float = 2 * 3600.0
    max_unavailable: int | None = None
    gates: tuple[str, ...] = ()
    on_failure: str = "rollback"
    min_requests: int = 20
    on_no_data: str = "hold"


@dataclass(frozen=True)
class Scenario:
    """A whole simulator scenario (see the module docstring for the YAML)."""

    name: str
    nodes: int = 1000
    horizon_s: float = 2 * 86400.0
    seed: int = 1
    profiles: Mapping[str, float] = field(
        default_factory=lambda: {"x86_64-avx2": 4, "arm64-neon": 3, "arm64-neon-dotprod": 2, "jetson-cuda": 1}
    )
    tiers: Mapping[str, float] = field(default_factory=lambda: {"device": 4, "near-edge": 1})
    regions: Mapping[str, float] = field(default_factory=lambda: {"eu-west": 2, "us-east": 2, "ap-south": 1})
    connectivity: tuple[Connectivity, ...] = (Connectivity("always", 1.0),)
    bandwidth_min: float = 200e3
    bandwidth_max: float = 5e6
    requests_per_hour: float = 600.0
    model: str = "digits"
    model_size: float = 8e6
    variants: tuple[str, ...] = ("cpu-generic", "x86_64-avx2", "arm64-neon")
    policy: Policy = field(default_factory=Policy)
    versions: Mapping[str, VersionFaults] = field(default_factory=lambda: {"1": VersionFaults(), "2": VersionFaults()})
    rollout: RolloutPlan = field(default_factory=RolloutPlan)
    lost_during_update: float = 0.0
    probation_s: float = 60.0
    tick_s: float = 60.0
    description: str = ""
    fleet_nodes: tuple[NodeSpec, ...] = ()
    pins: tuple[PinSpec, ...] = ()

    @classmethod
    def from_json(cls, raw: Any) -> Scenario:
        """Raises:
        ConfigError: a field is missing, malformed or out of range.
        """
        if not isinstance(raw, Mapping):
            raise ConfigError("a scenario must be a mapping")
        fleet = raw.get("fleet") or {}
        model = raw.get("model") or {}
        rollout = raw.get("rollout") or {}
        faults = raw.get("faults") or {}
        agent = raw.get("agent") or {}
        server = raw.get("server") or {}
        parts = (("fleet", fleet), ("model", model), ("rollout", rollout), ("faults", faults))
        for part, value in (*parts, ("agent", agent), ("server", server)):
            if not isinstance(value, Mapping):
                raise ConfigError(f"scenario {part!r} must be a mapping")
            _known_keys(value, SECTION_KEYS[part], f"scenario {part!r}")
        _known_keys(raw, SCENARIO_KEYS, "the scenario")
        defaults = cls(name="defaults")
        profiles = _weights(fleet.get("profiles"), "fleet.profiles", defaults.profiles)
        for profile in profiles:
            try:
                get_profile(profile)
            except ProfileError as exc:
                raise ConfigError(str(exc)) from None
        variants = tuple(str(v) for v in model.get("variants") or defaults.variants)
        for variant in variants:
            try:
                get_profile(variant)
            except ProfileError as exc:
                raise ConfigError(str(exc)) from None
        connectivity = tuple(Connectivity.from_json(c) for c in fleet.get("connectivity") or [{"model": "always"}])
        if not connectivity or sum(c.share for c in connectivity) <= 0:
            connectivity = (Connectivity("always", 1.0),)
        versions = {"1": VersionFaults()}
        for version, spec in (raw.get("versions") or {}).items():
            versions[str(version)] = VersionFaults.from_json(spec)
        plan = RolloutPlan(
            version=str(rollout.get("version", "2")),
            start_s=duration(rollout.get("start", 1800), "rollout.start"),
            waves=str(rollout.get("waves", "1%,10%,50%,100%")),
            bake_s=duration(rollout.get("bake", 1800), "rollout.bake"),
            wave_deadline_s=duration(rollout.get("wave_deadline", 7200), "rollout.wave_deadline"),
            max_unavailable=rollout.get("max_unavailable"),
            gates=tuple(str(g) for g in rollout.get("gates") or ()),
            on_failure=str(rollout.get("on_failure", "rollback")),
            min_requests=int(rollout.get("min_requests", 20)),
            on_no_data=check_no_data_policy(str(rollout.get("on_no_data", "hold")), "rollout.on_no_data"),
        )
        versions.setdefault(plan.version, VersionFaults())
        parse_waves(plan.waves)  # fail on a bad rollout now, not in the middle of a run
        for gate in plan.gates:
            parse_gate(gate)
        bandwidth = fleet.get("bandwidth") or {}
        if not isinstance(bandwidth, Mapping):
            raise ConfigError("fleet.bandwidth must be a mapping with min and max")
        _known_keys(bandwidth, frozenset({"min", "max"}), "fleet.bandwidth")
        fleet_nodes = tuple(NodeSpec.from_json(n) for n in fleet.get("nodes") or ())
        names = [n.name for n in fleet_nodes]
        if len(set(names)) != len(names):
            raise ConfigError("fleet.nodes names a node twice")
        pins = tuple(PinSpec.from_json(p) for p in raw.get("pins") or ())
        for pin in pins:
            if pin.version not in versions:
                raise ConfigError(f"a pin names version {pin.version!r}, which the scenario does not have")
            if fleet_nodes and pin.node is not None and pin.node not in names:
                raise ConfigError(f"a pin names node {pin.node!r}, which fleet.nodes does not list")
        try:
            policy = Policy.from_json(model.get("policy") or {})
        except PolicyError as exc:
            raise ConfigError(f"model.policy: {exc}") from None
        scenario = cls(
            name=str(raw.get("name", "scenario")),
            description=str(raw.get("description", "")),
            nodes=len(fleet_nodes) if fleet_nodes else int(raw.get("nodes", defaults.nodes)),
            horizon_s=duration(raw.get("horizon", defaults.horizon_s), "horizon"),
            seed=int(raw.get("seed", 1)),
            profiles=profiles,
            tiers=_weights(fleet.get("tiers"), "fleet.tiers", defaults.tiers),
            regions=_weights(fleet.get("regions"), "fleet.regions", defaults.regions),
            connectivity=connectivity,
            bandwidth_min=size(bandwidth.get("min", defaults.bandwidth_min), "fleet.bandwidth.min"),
            bandwidth_max=size(bandwidth.get("max", defaults.bandwidth_max), "fleet.bandwidth.max"),
            requests_per_hour=float(fleet.get("requests_per_hour", defaults.requests_per_hour)),
            model=str(model.get("name", defaults.model)),
            model_size=size(model.get("size", defaults.model_size), "model.size"),
            variants=variants,
            policy=policy,
            versions=versions,
            rollout=plan,
            lost_during_update=float(faults.get("lost_during_update", 0.0)),
            probation_s=duration(agent.get("probation", 60), "agent.probation"),
            tick_s=duration(server.get("tick", 60), "server.tick"),
            fleet_nodes=fleet_nodes,
            pins=pins,
        )
        if scenario.nodes < 1 or scenario.horizon_s <= 0 or scenario.tick_s <= 0:
            raise ConfigError("a scenario needs at least one node, a positive horizon and a positive server tick")
        if scenario.bandwidth_max < scenario.bandwidth_min:
            raise ConfigError("fleet.bandwidth: max is below min")
        if not 0 <= scenario.lost_during_update <= 1:
            raise ConfigError("faults.lost_during_update must be in [0, 1]")
        return scenario


def _known_keys(raw: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """Refuse keys a scenario part does not have: a misspelt one (`nodez`, `bak`) would be ignored, and the run
    would go by the default silently, its results looking like the scenario's.

    Raises:
        ConfigError: `raw` has a key outside `known`.
    """
    unknown = sorted(str(key) for key in raw if key not in known)
    if unknown:
        raise ConfigError(f"{where} has unknown keys {unknown}; known: {sorted(known)}")


def load_scenario(path: Path) -> Scenario:
    """Read a scenario file.

    Raises:
        ConfigError: unreadable, not YAML, or not a valid scenario.
    """
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"scenario {path} is not valid YAML: {exc}") from exc
    return Scenario.from_json(raw)
