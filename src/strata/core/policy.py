"""Placement policy: which models may run on which nodes. Pure parsing and evaluation, shared by both sides.

A policy travels in the package manifest's `policy` field (so the package digest covers it) and says what the
model is and where it may go:

    data_class: personal            # a model fact, visible to rules as model.data_class
    required_attestation: tpm       # the node must attest at least this (software < tpm; node.attestation)
    allowed_regions: ["eu-*"]       # shell globs over the node's `region` label
    allowed_jurisdictions: ["eu"]   # shell globs over the node's `jurisdiction` label
    rules:                          # Common Expression Language, evaluated with `model` and `node`
      - name: no-cloud
        allow: 'node.tier != "cloud"'          # must be true (or `deny:` must be false)
        message: personal data stays on site

The facts a rule sees: `model` {name, version, data_class, required_attestation, allowed_regions,
allowed_jurisdictions} and `node` {name, tier, profile, region, jurisdiction, attestation, labels}. A node is
allowed only when every built-in constraint and every rule holds; the first one that does not is the decision's
`rule`. Evaluation fails closed: a rule that cannot be evaluated (a missing label, a type error) forbids.

The control plane evaluates policies when it computes desired state; the agent again before it activates a
package. CEL rules need `cel-python` (module `celpy`, about 16 MB resident once imported), so it is imported only
when a policy has rules; the agent, which must stay under 70 MB, evaluates such policies in a child process
(`python -m strata.core.policy`, JSON in and out; see `strata.agent.placement`), and the built-in constraints
(regions, jurisdictions, attestation) in-process with no import at all.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from strata.core.attest import LEVELS, meets
from strata.core.errors import StrataError

RULE_KEYS: Final = frozenset({"name", "allow", "deny", "message"})
POLICY_KEYS: Final = frozenset(
    {"data_class", "required_attestation", "allowed_regions", "allowed_jurisdictions", "rules", "batching"}
)
MAX_RULES: Final = 64
MAX_EXPRESSION_CHARS: Final = 4096


class PolicyError(StrataError):
    """A policy document that does not parse, or a rule that is not valid CEL."""

    code = "policy_invalid"
    http_status = 422


@dataclass(frozen=True)
class Rule:
    """One CEL rule: `allow` must evaluate true, or `deny` must evaluate false."""

    name: str
    expression: str
    deny: bool = False
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "deny" if self.deny else "allow": self.expression}
        if self.message:
            body["message"] = self.message
        return body


@dataclass(frozen=True)
class Policy:
    """A model's placement policy (empty: allowed everywhere)."""

    data_class: str = ""
    required_attestation: str = ""
    allowed_regions: tuple[str, ...] = ()
    allowed_jurisdictions: tuple[str, ...] = ()
    rules: tuple[Rule, ...] = ()
    # Not a placement rule: how the node batches this model (`strata.agent.batch_plan` reads and checks it). Kept
    # so that the package's policy section round-trips whole; left out of equality and hashing, since it never
    # changes where a model may run.
    batching: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def empty(self) -> bool:
        return self == Policy()

    @property
    def has_rules(self) -> bool:
        """True when evaluating needs CEL (and so `celpy`)."""
        return bool(self.rules)

    def to_json(self) -> dict[str, Any]:
        """The manifest form: only the fields that are set, so an empty policy is `{}`."""
        body: dict[str, Any] = {}
        if self.data_class:
            body["data_class"] = self.data_class
        if self.required_attestation:
            body["required_attestation"] = self.required_attestation
        if self.allowed_regions:
            body["allowed_regions"] = list(self.allowed_regions)
        if self.allowed_jurisdictions:
            body["allowed_jurisdictions"] = list(self.allowed_jurisdictions)
        if self.rules:
            body["rules"] = [r.to_json() for r in self.rules]
        if self.batching:
            body["batching"] = dict(self.batching)
        return body

    @classmethod
    def from_json(cls, raw: Any) -> Policy:
        """Parse a policy document (the manifest's `policy` field, or a YAML file loaded as a mapping).

        Only the shape is checked here; `compile_rules` checks that the rules are valid CEL.

        Raises:
            PolicyError: unknown keys, wrong types, or a rule without a name or an expression.
        """
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise PolicyError("a policy must be a mapping")
        unknown = sorted(set(raw) - POLICY_KEYS)
        if unknown:
            raise PolicyError(f"policy has unknown keys {unknown}; known: {sorted(POLICY_KEYS)}")
        rules_raw = raw.get("rules") or []
        if not isinstance(rules_raw, list) or len(rules_raw) > MAX_RULES:
            raise PolicyError(f"policy 'rules' must be a list of at most {MAX_RULES} rules")
        rules = tuple(_rule(item, index) for index, item in enumerate(rules_raw))
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise PolicyError("policy names a rule twice")
        batching = raw.get("batching") or {}
        if not isinstance(batching, Mapping):
            raise PolicyError("policy 'batching' must be a mapping of batching settings")
        attestation = _string(raw, "required_attestation")
        if attestation not in ("", "none", *LEVELS):
            # A typo (`TPM`, `sofware`) would keep the model off every node: no node attests an unknown level.
            raise PolicyError(f"policy 'required_attestation' must be one of {['none', *LEVELS]}, got {attestation!r}")
        return cls(
            data_class=_string(raw, "data_class"),
            required_attestation=attestation,
            allowed_regions=_strings(raw, "allowed_regions"),
            allowed_jurisdictions=_strings(raw, "allowed_jurisdictions"),
            rules=rules,
            batching=dict(batching),
        )


def _string(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PolicyError(f"policy {key!r} must be a string")
    return value


def _strings(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f"policy {key!r} must be a list of non-empty strings")
    return tuple(value)


def _rule(raw: Any, index: int) -> Rule:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"policy rule {index} must be a mapping")
    unknown = sorted(set(raw) - RULE_KEYS)
    if unknown:
        raise PolicyError(f"policy rule {index} has unknown keys {unknown}; known: {sorted(RULE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"policy rule {index} needs a 'name'")
    if ("allow" in raw) == ("deny" in raw):
        raise PolicyError(f"policy rule {name!r} needs exactly one of 'allow' or 'deny'")
    expression = raw.get("allow", raw.get("deny"))
    if not isinstance(expression, str) or not expression.strip() or len(expression) > MAX_EXPRESSION_CHARS:
        raise PolicyError(f"policy rule {name!r}: the expression must be a non-empty string")
    message = raw.get("message", "")
    if not isinstance(message, str):
        raise PolicyError(f"policy rule {name!r}: 'message' must be a string")
    return Rule(name=name, expression=expression, deny="deny" in raw, message=message)


@dataclass(frozen=True)
class NodeFacts:
    """What a policy may know about a node. Hashable, so decisions can be cached per distinct node."""

    name: str = ""
    tier: str = ""
    profile: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    attestation: str = ""

    @classmethod
    def of(cls, name: str, tier: str, profile: str, labels: Mapping[str, str], attestation: str = "") -> NodeFacts:
        return cls(name=name, tier=tier, profile=profile, labels=tuple(sorted(labels.items())), attestation=attestation)

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def region(self) -> str:
        return self.label_map.get("region", "")

    @property
    def jurisdiction(self) -> str:
        return self.label_map.get("jurisdiction", "")

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tier": self.tier,
            "profile": self.profile,
            "region": self.region,
            "jurisdiction": self.jurisdiction,
            "attestation": self.attestation,
            "labels": self.label_map,
        }

    @classmethod
    def from_json(cls, raw: Any) -> NodeFacts:
        """Raises:
        PolicyError: not the shape `to_json` writes.
        """
        if not isinstance(raw, Mapping):
            raise PolicyError("node facts must be a mapping")
        labels = raw.get("labels") or {}
        if not isinstance(labels, Mapping) or not all(isinstance(v, str) for v in labels.values()):
            raise PolicyError("node facts: labels must map strings to strings")
        return cls.of(
            name=str(raw.get("name", "")),
            tier=str(raw.get("tier", "")),
            profile=str(raw.get("profile", "")),
            labels={str(k): v for k, v in labels.items()},
            attestation=str(raw.get("attestation", "")),
        )


@dataclass(frozen=True)
class ModelFacts:
    """The model a policy belongs to."""

    name: str
    version: str

    def to_json(self, policy: Policy) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "data_class": policy.data_class,
            "required_attestation": policy.required_attestation,
            "allowed_regions": list(policy.allowed_regions),
            "allowed_jurisdictions": list(policy.allowed_jurisdictions),
        }


@dataclass(frozen=True)
class Decision:
    """The outcome: allowed, or which rule forbids and why."""

    allowed: bool
    rule: str | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "rule": self.rule, "reason": self.reason}

    @classmethod
    def from_json(cls, raw: Any) -> Decision:
        """Raises:
        PolicyError: not the shape `to_json` writes.
        """
        if not isinstance(raw, Mapping) or not isinstance(raw.get("allowed"), bool):
            raise PolicyError("a policy decision must be a mapping with a boolean 'allowed'")
        rule = raw.get("rule")
        return cls(allowed=raw["allowed"], rule=str(rule) if rule is not None else None, reason=str(raw.get("reason")))


ALLOWED: Final = Decision(allowed=True)


def _globs_allow(globs: tuple[str, ...], value: str) -> bool:
    return bool(value) and any(fnmatch.fnmatchcase(value, pattern) for pattern in globs)


def check_builtins(policy: Policy, node: NodeFacts) -> Decision:
    """The built-in constraints (regions, jurisdictions, attestation): no CEL, no imports."""
    if policy.allowed_regions and not _globs_allow(policy.allowed_regions, node.region):
        where = f"region {node.region!r}" if node.region else "no region label"
        return Decision(
            False,
            "allowed_regions",
            f"node {node.name or '?'} has {where}; the model may run only in {list(policy.allowed_regions)}",
        )
    if policy.allowed_jurisdictions and not _globs_allow(policy.allowed_jurisdictions, node.jurisdiction):
        where = f"jurisdiction {node.jurisdiction!r}" if node.jurisdiction else "no jurisdiction label"
        return Decision(
            False,
            "allowed_jurisdictions",
            f"node {node.name or '?'} has {where}; the model may run only in {list(policy.allowed_jurisdictions)}",
        )
    wanted = policy.required_attestation
    if not meets(node.attestation, wanted):
        offered = node.attestation or "no attestation"
        return Decision(
            False, "required_attestation", f"the model requires {wanted} attestation; node offers {offered}"
        )
    return ALLOWED


# --- CEL -------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _program(expression: str) -> Any:
    """A compiled CEL program (cached: parsing with lark costs milliseconds).

    Raises:
        PolicyError: `celpy` is not installed, or the expression is not valid CEL.
    """
    try:
        import celpy
    except ImportError as exc:  # the agent installs it; a bare environment may not have it
        raise PolicyError("evaluating policy rules needs cel-python (pip install cel-python)") from exc
    environment = celpy.Environment()
    try:
        return environment.program(environment.compile(expression))
    except Exception as exc:  # celpy raises CELParseError and lark errors; report them as the rule's fault
        raise PolicyError(f"not valid CEL: {expression!r}: {exc}".splitlines()[0]) from exc


def compile_rules(policy: Policy) -> None:
    """Check that every rule of `policy` is valid CEL (at push and at upload, so mistakes surface early).

    Raises:
        PolicyError: a rule does not compile, or `celpy` is not installed.
    """
    for rule in policy.rules:
        try:
            _program(rule.expression)
        except PolicyError as exc:
            raise PolicyError(f"policy rule {rule.name!r}: {exc}") from None


def _evaluate_rule(rule: Rule, activation: Mapping[str, Any]) -> bool | str:
    """True/False, or a string saying why the rule could not be evaluated."""
    try:
        program = _program(rule.expression)
        result = program.evaluate(activation)
    except PolicyError as exc:
        return str(exc)
    except Exception as exc:  # celpy raises CELEvalError (missing keys, type errors): fail closed
        return f"cannot be evaluated: {exc.args[0] if exc.args else exc}"
    if isinstance(result, Exception):  # celpy may return its evaluation errors as values
        return f"cannot be evaluated: {result.args[0] if result.args else result}"
    if type(result).__name__ != "BoolType" and not isinstance(result, bool):
        return f"evaluates to {type(result).__name__}, not a boolean"
    return bool(result)


def check_rules(policy: Policy, model: ModelFacts, node: NodeFacts) -> Decision:
    """The CEL rules, in order; the first that does not hold decides.

    Imports `celpy` (about 16 MB resident): in the agent, run this in a child process (`main`).
    """
    if not policy.rules:
        return ALLOWED
    from celpy.adapter import json_to_cel

    activation = {"model": json_to_cel(model.to_json(policy)), "node": json_to_cel(node.to_json())}
    for rule in policy.rules:
        outcome = _evaluate_rule(rule, activation)
        if outcome is (not rule.deny):
            continue
        if isinstance(outcome, str):
            return Decision(False, rule.name, f"policy rule {rule.name!r} {outcome}")
        why = rule.message or f"{'deny' if rule.deny else 'allow'}: {rule.expression}"
        return Decision(False, rule.name, f"policy rule {rule.name!r} forbids node {node.name or '?'}: {why}")
    return ALLOWED


@functools.lru_cache(maxsize=65536)
def evaluate(policy: Policy, model: ModelFacts, node: NodeFacts) -> Decision:
    """May `model` under `policy` run on `node`? Built-in constraints first, then the CEL rules.

    Cached per (policy, model, node facts): a fleet has far fewer distinct label sets than nodes.
    """
    decision = check_builtins(policy, node)
    if not decision.allowed:
        return decision
    return check_rules(policy, model, node)


def load_policy_file(text: str) -> Policy:
    """Parse a policy file (YAML, or JSON, which is YAML too) and check its rules compile.

    Raises:
        PolicyError: not YAML, not a policy, or a rule that is not valid CEL.
    """
    import yaml

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"policy file is not valid YAML: {exc}") from exc
    policy = Policy.from_json(raw or {})
    compile_rules(policy)
    return policy


def main() -> None:
    """`python -m strata.core.policy`: read {"policy", "model", "node"} as JSON on stdin, print the decision.

    The agent runs this in a child process, so that cel-python's memory never joins the agent's.
    """
    try:
        request = json.loads(sys.stdin.read())
        policy = Policy.from_json(request["policy"])
        model = ModelFacts(name=str(request["model"]["name"]), version=str(request["model"]["version"]))
        node = NodeFacts.from_json(request["node"])
        decision = evaluate(policy, model, node)
    except (PolicyError, ValueError, KeyError, TypeError) as exc:
        decision = Decision(False, "policy", f"policy cannot be evaluated: {exc}")
    sys.stdout.write(json.dumps(decision.to_json()) + "\n")


if __name__ == "__main__":
    main()
