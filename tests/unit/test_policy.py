"""Placement policy: built-in constraints, CEL rules, failing closed, the file format and the child protocol."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from strata.core.policy import (
    Decision,
    ModelFacts,
    NodeFacts,
    Policy,
    PolicyError,
    check_builtins,
    compile_rules,
    evaluate,
    load_policy_file,
)

MODEL = ModelFacts("faces", "3")


def facts(region: str = "", tier: str = "device", **labels: str) -> NodeFacts:
    if region:
        labels["region"] = region
    return NodeFacts.of("node-1", tier, "x86_64-avx2", labels)


def test_an_empty_policy_allows_everything() -> None:
    assert Policy.from_json({}).empty
    assert evaluate(Policy(), MODEL, facts()).allowed


def test_allowed_regions_are_globs_over_the_region_label() -> None:
    eu_only = Policy.from_json({"allowed_regions": ["eu-*"]})
    assert evaluate(eu_only, MODEL, facts("eu-west")).allowed
    assert evaluate(eu_only, MODEL, facts("eu-central-1")).allowed
    refused = evaluate(eu_only, MODEL, facts("us-east"))
    assert not refused.allowed
    assert refused.rule == "allowed_regions"
    assert "us-east" in refused.reason
    assert "eu-*" in refused.reason
    assert evaluate(eu_only, MODEL, facts()).rule == "allowed_regions"  # no region label: not provably allowed


def test_jurisdictions_and_attestation() -> None:
    policy = Policy.from_json({"allowed_jurisdictions": "eu", "required_attestation": "tpm"})
    assert evaluate(policy, MODEL, facts(jurisdiction="us")).rule == "allowed_jurisdictions"
    refused = evaluate(policy, MODEL, facts(jurisdiction="eu"))
    assert refused.rule == "required_attestation"
    assert "offers no attestation" in refused.reason
    attested = NodeFacts.of("n", "device", "p", {"jurisdiction": "eu"}, attestation="tpm")
    assert evaluate(policy, MODEL, attested).allowed


def test_cel_rules_see_model_and_node_facts() -> None:
    policy = Policy.from_json(
        {
            "data_class": "personal",
            "rules": [
                {"name": "no-cloud", "allow": 'node.tier != "cloud"', "message": "personal data stays on site"},
                {"name": "not-in-shop", "deny": 'model.data_class == "personal" && node.labels.site == "shop"'},
                {"name": "eu-only", "allow": 'node.region.startsWith("eu-")'},
            ],
        }
    )
    compile_rules(policy)
    assert evaluate(policy, MODEL, facts("eu-west", site="lab")).allowed
    cloud = evaluate(policy, MODEL, facts("eu-west", tier="cloud", site="lab"))
    assert (cloud.allowed, cloud.rule) == (False, "no-cloud")
    assert "personal data stays on site" in cloud.reason
    assert evaluate(policy, MODEL, facts("eu-west", site="shop")).rule == "not-in-shop"
    assert evaluate(policy, MODEL, facts("us-east", site="lab")).rule == "eu-only"


def test_rules_that_cannot_be_evaluated_forbid() -> None:
    missing_label = Policy.from_json({"rules": [{"name": "site", "allow": 'node.labels.site == "lab"'}]})
    decision = evaluate(missing_label, MODEL, facts("eu-west"))
    assert not decision.allowed
    assert "cannot be evaluated" in decision.reason
    not_boolean = Policy.from_json({"rules": [{"name": "number", "allow": "1 + 1"}]})
    assert "not a boolean" in evaluate(not_boolean, MODEL, facts()).reason


def test_malformed_policies_are_refused_with_the_reason() -> None:
    for bad, words in (
        ({"colour": "red"}, "unknown keys"),
        ({"allowed_regions": [1]}, "non-empty strings"),
        ({"rules": [{"allow": "true"}]}, "needs a 'name'"),
        ({"rules": [{"name": "a", "allow": "true", "deny": "false"}]}, "exactly one"),
        ({"rules": [{"name": "a", "allow": "true"}, {"name": "a", "allow": "true"}]}, "twice"),
        ("eu only", "mapping"),
        ({"required_attestation": "TPM"}, r"must be one of \['none', 'software', 'tpm'\], got 'TPM'"),
        ({"required_attestation": "bogus"}, "required_attestation"),
    ):
        with pytest.raises(PolicyError, match=words):
            Policy.from_json(bad)
    for level in ("none", "software", "tpm"):  # every level a node attests, and none
        assert Policy.from_json({"required_attestation": level}).required_attestation == level
    with pytest.raises(PolicyError, match="broken"):
        compile_rules(Policy.from_json({"rules": [{"name": "broken", "allow": "node.tier =="}]}))


def test_policy_files_are_yaml_and_round_trip_through_the_manifest_form() -> None:
    policy = load_policy_file(
        "data_class: personal\nallowed_regions: [eu-*]\nrules:\n  - name: no-cloud\n    allow: node.tier != 'cloud'\n"
    )
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))) == policy
    assert policy.to_json()["rules"] == [{"name": "no-cloud", "allow": "node.tier != 'cloud'"}]
    with pytest.raises(PolicyError, match="YAML"):
        load_policy_file("rules: [")


def test_builtins_need_no_cel() -> None:
    eu_only = Policy.from_json({"allowed_regions": ["eu-*"]})
    assert not eu_only.has_rules
    assert check_builtins(eu_only, facts("us-east")).rule == "allowed_regions"


def test_the_child_process_protocol_gives_the_same_decision() -> None:
    policy = Policy.from_json({"rules": [{"name": "eu-only", "allow": 'node.region.startsWith("eu-")'}]})
    request = {
        "policy": policy.to_json(),
        "model": {"name": "faces", "version": "3"},
        "node": facts("us-east").to_json(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "strata.core.policy"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    answer = Decision.from_json(json.loads(done.stdout))
    assert answer == evaluate(policy, MODEL, facts("us-east"))
    assert answer.rule == "eu-only"
    garbage = subprocess.run(
        [sys.executable, "-m", "strata.core.policy"], input="{", capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(garbage.stdout)["allowed"] is False


def test_a_batching_section_rides_along_without_changing_placement() -> None:
    raw = {"allowed_regions": ["eu-*"], "batching": {"max_batch_size": 8, "preferred_batch_sizes": [4, 8]}}
    policy = Policy.from_json(raw)
    assert policy.to_json() == raw
    assert policy == Policy.from_json({"allowed_regions": ["eu-*"]})  # placement is the same
    assert hash(policy) == hash(Policy.from_json({"allowed_regions": ["eu-*"]}))
    assert Policy.from_json({"batching": {"max_batch_size": 8}}).empty
    with pytest.raises(PolicyError, match="batching"):
        Policy.from_json({"batching": [8]})
