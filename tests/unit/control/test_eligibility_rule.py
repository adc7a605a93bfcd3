"""May this version reach this node, and why not: each reason, over plain values, and what the planner observes."""

from __future__ import annotations

from strata.control.desired import decide
from strata.control.eligibility_rule import FleetNode, Release, exclusion, observe_fleet, placement
from strata.control.gates import DriftFigure
from strata.control.rollout_plan import RolloutSpec, RolloutState
from strata.core.policy import NodeFacts, Policy, Rule
from strata.core.wire import Failure, ModelStatus, NodeStatus, ServingCounters, VariantRef


def variant(profile: str, char: str = "a") -> VariantRef:
    return VariantRef(f"{profile}-fp32", profile, "onnxruntime", "fp32", "sha256:" + char * 64, char * 64, 100)


def release(*policies: Policy, version: str = "2", profiles: tuple[str, ...] = ("x86_64-avx2",)) -> Release:
    variants = tuple(variant(p, str(i)) for i, p in enumerate(profiles))
    by_id = {v.id: p for v, p in zip(variants, policies, strict=False) if not p.empty}
    return Release("digits", version, variants, by_id)


def node(
    name: str = "n1",
    labels: dict[str, str] | None = None,
    profile: str = "x86_64-avx2",
    tier: str = "device",
    attestation: str = "",
    status: NodeStatus | None = None,
) -> FleetNode:
    labels = labels if labels is not None else {"region": "eu-west", "jurisdiction": "eu"}
    facts = NodeFacts.of(name, tier, profile, labels, attestation)
    return FleetNode(f"id-{name}", name, labels, facts, status, online=True)


EU_ONLY = Policy(allowed_regions=("eu-*",))


def test_an_eligible_node_has_no_reason() -> None:
    assert exclusion(node(), release(), []) is None
    assert exclusion(node(), release(EU_ONLY), []) is None


def test_a_pin_holds_the_node_before_any_other_rule() -> None:
    pinned = release(version="1").entry(7, 5.0, kind="pin", only_nodes=frozenset({"id-n1"}))
    us = node(labels={"region": "us-east"})
    assert exclusion(node(), release(), [pinned]) == "pinned to 1 (pin 7)"
    assert exclusion(us, release(EU_ONLY), [pinned]) == "pinned to 1 (pin 7)"  # the pin is named, not the policy
    assert exclusion(node("n2"), release(), [pinned]) is None  # a node pin holds that node only
    by_label = release(version="1").entry(8, 1.0, {"ring": "frozen"}, kind="pin")
    newer = release(version="3").entry(9, 9.0, {"ring": "frozen"}, kind="pin")
    frozen = node(labels={"ring": "frozen"})
    assert exclusion(frozen, release(), [by_label, newer]) == "pinned to 3 (pin 9)"  # the newest pin
    other_model = Release("faces", "1", (variant("cpu-generic"),)).entry(10, 1.0, kind="pin")
    assert exclusion(node(), release(), [other_model]) is None


def test_a_pin_whose_own_policy_forbids_the_node_holds_nothing_there_as_in_the_desired_state_rule() -> None:
    eu_only_1 = release(EU_ONLY, version="1").entry(7, 5.0, kind="pin", only_nodes=frozenset({"id-us"}))
    us = node("us", {"region": "us-east"})
    # the desired-state rule passes over the pin (its version may not run there) ...
    decided, refused = decide(us.id, us.labels, [eu_only_1], us.facts)
    assert decided == {}
    assert [entry.id for entry, _ in refused["digits"]] == [7]
    # ... so the rollout is not held by it: the node is judged by the rollout's own version
    assert exclusion(us, release(), [eu_only_1]) is None
    assert exclusion(us, release(EU_ONLY), [eu_only_1]) == (
        "policy rule allowed_regions: node us has region 'us-east'; the model may run only in ['eu-*']"
    )


def test_a_policy_names_its_rule_regions_jurisdictions_data_class_attestation() -> None:
    us = node("us", {"region": "us-east", "jurisdiction": "us"})
    assert exclusion(us, release(EU_ONLY), []) == (
        "policy rule allowed_regions: node us has region 'us-east'; the model may run only in ['eu-*']"
    )
    eu_law = Policy(allowed_jurisdictions=("eu",))
    assert exclusion(us, release(eu_law), []) == (
        "policy rule allowed_jurisdictions: node us has jurisdiction 'us'; the model may run only in ['eu']"
    )
    personal = Policy(
        data_class="personal",
        rules=(Rule("personal-on-site", 'model.data_class != "personal" || node.tier != "cloud"', message="on site"),),
    )
    assert exclusion(node(), release(personal), []) is None
    assert exclusion(node("c", tier="cloud"), release(personal), []) == (
        "policy rule personal-on-site: policy rule 'personal-on-site' forbids node c: on site"
    )
    tpm = Policy(required_attestation="tpm")
    assert exclusion(node(), release(tpm), []) == (
        "policy rule required_attestation: the model requires tpm attestation; node offers no attestation"
    )
    assert exclusion(node(attestation="tpm"), release(tpm), []) is None


def test_the_hardware_profile_must_run_an_allowed_variant() -> None:
    assert exclusion(node(profile="arm64-neon"), release(), []) == ("no variant of digits 2 runs on profile arm64-neon")
    assert exclusion(node(profile="no-such-board"), release(), []) == (
        "no variant of digits 2 runs on profile no-such-board"
    )
    # Only the variants a policy allows count: the ARM build may run on an ARM node, but not in the US.
    both = release(Policy(), EU_ONLY, profiles=("x86_64-avx2", "arm64-neon"))
    us_arm = node("a", {"region": "us-east"}, profile="arm64-neon")
    allowed, decision = placement(both, us_arm.facts)
    assert [v.profile for v in allowed] == ["x86_64-avx2"]
    assert decision.allowed
    assert exclusion(us_arm, both, []) == "no variant of digits 2 runs on profile arm64-neon"
    assert exclusion(node(), Release("digits", "2", ()), []) == "digits 2 has no variants"


def test_observing_takes_the_report_the_reason_and_the_drift() -> None:
    serving = ServingCounters(requests=40, errors=1, latency_p95_ms=3.0, since=100.0)
    running = ModelStatus("digits", "2", "x86_64-avx2-fp32", "sha256:" + "0" * 64, 100.0, serving=serving)
    failure = Failure("digits", "2", None, "golden outputs differ", 90.0, kind="health")
    old = Failure("digits", "1", None, "an older version's", 10.0)
    status = NodeStatus("device", {}, "x86_64-avx2", False, "test", (running,), (old, failure))
    fleet = [
        node("on", {"ring": "a", "region": "eu-west"}, status=status),
        node("us", {"ring": "a", "region": "us-east"}),
        node("off", {"ring": "b"}),
    ]
    rollout = RolloutState(1, "digits", "2", {"ring": "a"}, RolloutSpec(), created_at=0.0)
    seen = observe_fleet(rollout, fleet, release(EU_ONLY), [], {"id-on": DriftFigure(0.3, 40)})
    assert set(seen) == {"id-on", "id-us"}  # the selector decides who is observed
    on, us = seen["id-on"], seen["id-us"]
    assert (on.version, on.serving, on.failure, on.excluded) == ("2", serving, failure, None)
    assert on.drift == DriftFigure(0.3, 40)
    assert (on.tier, on.profile, on.online) == ("device", "x86_64-avx2", True)
    assert us.version is None
    assert us.drift == DriftFigure(None, 0)  # no figure: it served nothing in the window
    assert (us.excluded or "").startswith("policy rule allowed_regions")
    assert observe_fleet(rollout, fleet, release(), [])["id-on"].drift is None  # no drift reference at all
