"""The agent's own check of a package's placement policy, before it activates (or restores) the package.

The control plane never sends a node a model its policy forbids there; the node checks again, because the
policy travels in the package it verified, and a node must refuse what it may not run even when the desired
state says otherwise (an old desired state on disk, labels changed while offline, a compromised server).

The built-in constraints (regions, jurisdictions, attestation) are evaluated here, with no import. CEL rules
need cel-python, about 16 MB resident once imported: more than the agent's 70 MB budget allows. So a policy with
rules is evaluated by the same `strata.core.policy` code in a child process (`python -m strata.core.policy`, run
by `children.run_child`, JSON in and out, ~0.4 s, once per activation); its memory is gone when it exits. When the
child cannot run or answer, the package is refused: a node refuses what it cannot verify.
"""

from __future__ import annotations

import json
from typing import Final

from strata.agent.children import ChildFailed, run_child
from strata.core.package import Manifest
from strata.core.policy import Decision, ModelFacts, NodeFacts, Policy, PolicyError, check_builtins

CHILD_TIMEOUT_S: Final = 60.0


def _evaluate_in_child(policy: Policy, model: ModelFacts, node: NodeFacts, timeout_s: float) -> Decision:
    request = {
        "policy": policy.to_json(),
        "model": {"name": model.name, "version": model.version},
        "node": node.to_json(),
    }
    try:
        finished = run_child(
            "strata.core.policy",
            stdin=json.dumps(request).encode(),
            timeout_s=timeout_s,
            what="the policy evaluator",
            optimize=False,
        )
    except ChildFailed as exc:
        return Decision(False, "policy", f"policy rules could not be evaluated: {exc.reason}")
    if finished.returncode != 0:
        return Decision(False, "policy", f"policy rules could not be evaluated: {finished.failure('no output')}")
    try:
        return Decision.from_json(json.loads(finished.stdout))
    except (ValueError, PolicyError) as exc:
        return Decision(False, "policy", f"policy evaluator answered something unreadable: {exc}")


def check_placement(manifest: Manifest, node: NodeFacts, timeout_s: float = CHILD_TIMEOUT_S) -> Decision:
    """May this node run the package `manifest` describes? Fails closed."""
    try:
        policy = Policy.from_json(manifest.policy)
    except PolicyError as exc:
        return Decision(False, "policy", f"the package's policy does not parse: {exc}")
    decision = check_builtins(policy, node)
    if not decision.allowed or not policy.has_rules:
        return decision
    return _evaluate_in_child(policy, ModelFacts(manifest.name, manifest.version), node, timeout_s)
