"""The desired-state rule: the latest matching deployment of each model decides what a node runs."""

from __future__ import annotations

from strata.control.desired import (
    count_matching,
    deciding_deployments,
    desired_state,
    etag_matches,
    referenced_blobs,
)
from strata.control.eligibility_rule import ActiveDeployment
from strata.core.wire import DesiredState, VariantRef


def _variant(variant_id: str, blob_char: str) -> VariantRef:
    return VariantRef(
        id=variant_id,
        profile="cpu-generic",
        runtime="onnxruntime",
        precision="fp32",
        digest="sha256:" + blob_char * 64,
        blob=blob_char * 64,
        size=100,
    )


def _deployment(
    deployment_id: int,
    model: str,
    version: str,
    selector: dict[str, str] | None = None,
    created_at: float = 0.0,
    variants: tuple[VariantRef, ...] | None = None,
) -> ActiveDeployment:
    return ActiveDeployment(
        id=deployment_id,
        model=model,
        version=version,
        selector=selector or {},
        created_at=created_at,
        variants=variants or (_variant("cpu-generic-fp32", str(deployment_id % 10)),),
    )


def _versions(state: DesiredState) -> dict[str, str]:
    return {m.name: m.version for m in state.models}


def test_no_deployments_no_models() -> None:
    assert desired_state("n1", {"site": "lab"}, False, []) == DesiredState(node_id="n1", models=())


def test_the_latest_matching_deployment_wins() -> None:
    deployments = [
        _deployment(1, "digits", "1", created_at=10),
        _deployment(2, "digits", "2", {"ring": "canary"}, created_at=20),
        _deployment(3, "digits", "3", {"ring": "beta"}, created_at=30),
    ]
    assert _versions(desired_state("n", {"ring": "canary"}, False, deployments)) == {"digits": "2"}
    assert _versions(desired_state("n", {"ring": "beta"}, False, deployments)) == {"digits": "3"}
    assert _versions(desired_state("n", {}, False, deployments)) == {"digits": "1"}


def test_a_newer_broad_deployment_overrides_an_older_narrow_one() -> None:
    deployments = [
        _deployment(1, "digits", "2", {"ring": "canary"}, created_at=10),
        _deployment(2, "digits", "3", created_at=20),
    ]
    assert _versions(desired_state("n", {"ring": "canary"}, False, deployments)) == {"digits": "3"}


def test_equal_times_are_broken_by_the_higher_id() -> None:
    deployments = [_deployment(7, "digits", "b", created_at=5), _deployment(6, "digits", "a", created_at=5)]
    assert _versions(desired_state("n", {}, False, deployments)) == {"digits": "b"}
    assert deciding_deployments({}, reversed(deployments))["digits"].id == 7


def test_selectors_need_every_key_with_that_value() -> None:
    deployment = _deployment(1, "digits", "1", {"site": "lab", "gpu": "yes"})
    assert _versions(desired_state("n", {"site": "lab", "gpu": "yes", "extra": "x"}, False, [deployment]))
    assert not _versions(desired_state("n", {"site": "lab"}, False, [deployment]))
    assert not _versions(desired_state("n", {"site": "lab", "gpu": "no"}, False, [deployment]))


def test_each_model_is_decided_on_its_own_and_listed_by_name() -> None:
    deployments = [
        _deployment(1, "zeta", "1", created_at=1),
        _deployment(2, "alpha", "4", {"site": "lab"}, created_at=2),
        _deployment(3, "zeta", "2", {"site": "shop"}, created_at=3),
    ]
    state = desired_state("n", {"site": "lab"}, False, deployments)
    assert [(m.name, m.version, m.deployment) for m in state.models] == [("alpha", "4", "2"), ("zeta", "1", "1")]


def test_a_deleted_deployment_gives_way_to_the_next_matching_one() -> None:
    older = _deployment(1, "digits", "1", created_at=1)
    newer = _deployment(2, "digits", "2", created_at=2)
    assert _versions(desired_state("n", {}, False, [older, newer])) == {"digits": "2"}
    assert _versions(desired_state("n", {}, False, [older])) == {"digits": "1"}
    assert _versions(desired_state("n", {}, False, [])) == {}


def test_variants_are_sorted_by_id_and_carry_their_blobs() -> None:
    variants = (_variant("x86_64-avx2-int8", "b"), _variant("cpu-generic-fp32", "a"))
    state = desired_state("n", {}, False, [_deployment(1, "digits", "1", variants=variants)])
    [model] = state.models
    assert [v.id for v in model.variants] == ["cpu-generic-fp32", "x86_64-avx2-int8"]
    assert referenced_blobs(state) == {"a" * 64, "b" * 64}


def test_a_revoked_node_gets_nothing() -> None:
    state = desired_state("n", {}, True, [_deployment(1, "digits", "1")])
    assert state.models == ()
    assert referenced_blobs(state) == frozenset()


def test_the_etag_changes_with_the_state_and_only_with_it() -> None:
    deployments = [_deployment(1, "digits", "1")]
    same = desired_state("n", {}, False, deployments)
    assert same.etag == desired_state("n", {"other": "label"}, False, deployments).etag
    assert same.etag != desired_state("n", {}, False, [*deployments, _deployment(2, "digits", "2", created_at=1)]).etag
    assert same.etag != desired_state("m", {}, False, deployments).etag


def test_count_matching() -> None:
    fleet = [{"site": "lab"}, {"site": "lab", "ring": "canary"}, {}]
    assert count_matching({}, fleet) == 3
    assert count_matching({"site": "lab"}, fleet) == 2
    assert count_matching({"ring": "canary", "site": "shop"}, fleet) == 0


def test_etag_matches_if_none_match_forms() -> None:
    etag = '"sha256:abc"'
    assert etag_matches(etag, etag)
    assert etag_matches(f'"other", {etag}', etag)
    assert etag_matches(f"W/{etag}", etag)
    assert etag_matches("*", etag)
    assert not etag_matches(None, etag)
    assert not etag_matches('"sha256:abd"', etag)


# --- rollouts, pins and policies as entries of the rule ---------------------------------------------------


def test_a_rollout_reaches_only_its_released_nodes_until_it_succeeds() -> None:
    from dataclasses import replace

    base = _deployment(1, "digits", "1", created_at=10)
    rollout = replace(_deployment(2, "digits", "2", created_at=20), kind="rollout", only_nodes=frozenset({"a"}))
    assert _versions(desired_state("a", {}, False, [base, rollout])) == {"digits": "2"}
    assert _versions(desired_state("b", {}, False, [base, rollout])) == {"digits": "1"}
    state = desired_state("a", {}, False, [base, rollout])
    assert state.models[0].deployment == "rollout/2"
    succeeded = replace(rollout, only_nodes=None)
    assert _versions(desired_state("b", {}, False, [base, succeeded])) == {"digits": "2"}
    # A plain deployment made later still wins over it: latest wins, whatever the kind.
    later = _deployment(3, "digits", "3", created_at=30)
    assert _versions(desired_state("a", {}, False, [base, rollout, later])) == {"digits": "3"}


def test_a_pin_beats_newer_deployments_and_rollouts() -> None:
    from dataclasses import replace

    pin = replace(_deployment(9, "digits", "1", created_at=5), kind="pin", only_nodes=frozenset({"a"}))
    newer = _deployment(1, "digits", "2", created_at=50)
    assert _versions(desired_state("a", {}, False, [pin, newer])) == {"digits": "1"}
    assert desired_state("a", {}, False, [pin, newer]).models[0].deployment == "pin/9"
    assert _versions(desired_state("b", {}, False, [pin, newer])) == {"digits": "2"}


def test_a_policy_that_forbids_the_node_hands_the_decision_to_the_next_entry() -> None:
    from dataclasses import replace

    from strata.control.desired import decide
    from strata.core.policy import NodeFacts, Policy

    base = _deployment(1, "digits", "1", created_at=10)
    eu_only = Policy.from_json({"allowed_regions": ["eu-*"]})
    restricted = replace(_deployment(2, "digits", "2", created_at=20), policies={"cpu-generic-fp32": eu_only})
    us = NodeFacts.of("us-1", "device", "cpu-generic", {"region": "us-east"})
    eu = NodeFacts.of("eu-1", "device", "cpu-generic", {"region": "eu-west"})
    assert _versions(desired_state("us-1", us.label_map, False, [base, restricted], us)) == {"digits": "1"}
    assert _versions(desired_state("eu-1", eu.label_map, False, [base, restricted], eu)) == {"digits": "2"}
    assert _versions(desired_state("us-1", us.label_map, False, [restricted], us)) == {}
    decided, refused = decide("us-1", us.label_map, [base, restricted], us)
    assert decided["digits"].deployment.id == 1
    [(entry, decision)] = refused["digits"]
    assert entry.id == 2
    assert decision.rule == "allowed_regions"


def test_only_the_variants_a_policy_allows_are_offered() -> None:
    from dataclasses import replace

    from strata.core.policy import NodeFacts, Policy

    variants = (_variant("cpu-generic-fp32", "a"), _variant("x86_64-avx2-fp32", "b"))
    no_cloud = Policy.from_json({"rules": [{"name": "no-cloud", "allow": 'node.tier != "cloud"'}]})
    entry = replace(_deployment(1, "digits", "1", variants=variants), policies={"x86_64-avx2-fp32": no_cloud})
    cloud = NodeFacts.of("c", "cloud", "x86_64-avx2", {})
    state = desired_state("c", {}, False, [entry], cloud)
    assert [v.id for v in state.models[0].variants] == ["cpu-generic-fp32"]
