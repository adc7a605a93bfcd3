"""Messages between agent and control plane: enrollment, desired state and observed state.

Plain dataclasses with `to_json`/`from_json`, so the agent can read them without pydantic (it must stay
small); the control plane serves the same shapes. Every parser checks types and raises `ProtocolError`.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar, get_args

from strata.core.errors import StrataError
from strata.core.hashing import digest_json, is_hex_sha256

# The node tiers, the probation states and the supply modes a status report may carry: Literals that mypy holds the
# agent and the control plane's schemas to (tests/unit/test_wire_schemas.py), with their values as tuples for checks.
Tier = Literal["device", "near-edge", "cloud"]
TIERS: Final[tuple[Tier, ...]] = get_args(Tier)
# Revoked certificates stay listed only until they expire (a day by default), so a fleet lists few; the cap bounds
# what a node accepts from the wire.
MAX_REVOKED_CERTIFICATES: Final = 100_000
# The most log lines an operator may ask a node for (`strata nodes logs --lines`); the agent keeps at most this many.
MAX_LOG_LINES: Final = 2000

T = TypeVar("T")


def error_text(body: bytes) -> str:
    """What an error answer says: the `error` of its JSON body (the control plane's and the Open Inference
    Protocol's shape), else the start of the body as text. A claim of whoever answered, logged and passed on: cut to
    1000 characters (the body to 200), each hidden character written out (`strata.core.words.printable`); a body
    nested past the JSON parser's depth is quoted too."""
    import json

    from strata.core.words import printable

    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):  # not JSON (or not UTF-8), or nested past the parser's depth
        parsed = None
    said = parsed.get("error") if isinstance(parsed, dict) else None
    return printable(said[:1000] if isinstance(said, str) else body[:200].decode(errors="replace"))


K = TypeVar("K", bound=str)


class ProtocolError(StrataError):
    """A message that does not have the shape the protocol says."""

    code = "protocol_error"
    http_status = 422


def _req(raw: Mapping[str, Any], key: str, kind: type[T], what: str) -> T:
    value = raw.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"{what}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _opt(raw: Mapping[str, Any], key: str, kind: type[T], what: str, default: T) -> T:
    if raw.get(key) is None:
        return default
    return _req(raw, key, kind, what)


def _one_of(value: str, choices: tuple[K, ...], what: str) -> K:
    """`value` as one of the Literal's `choices`; a `ProtocolError` naming them otherwise."""
    for choice in choices:
        if value == choice:
            return choice
    raise ProtocolError(f"{what} {value!r} is not one of {list(choices)}")


def tier_of(value: str) -> Tier:
    """`value` as a `Tier`.

    Raises:
        ProtocolError: it is not one of `TIERS`.
    """
    return _one_of(value, TIERS, "tier")


def _opt_str(raw: Mapping[str, Any], key: str, what: str) -> str | None:
    if raw.get(key) is None:
        return None
    return _req(raw, key, str, what)


MAX_URL_LEN: Final = 512


def check_serve_url(url: str, what: str = "serve_url") -> str:
    """A node's serving address as other nodes will dial it: `http(s)://host:port`, nothing else (no credentials,
    path, query or fragment; printable ASCII, at most 512 characters).

    Raises:
        ProtocolError: anything else.
    """
    problem = f"{what} must be http(s)://host:port, got {url[:80]!r}"
    if len(url) > MAX_URL_LEN or not url.isascii() or not all(32 < ord(c) < 127 for c in url):
        raise ProtocolError(problem)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise ProtocolError(problem) from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or port is None
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ProtocolError(problem)
    return url


def _serve_url(raw: Mapping[str, Any], what: str) -> str | None:
    url = _opt_str(raw, "serve_url", what)
    return None if url is None else check_serve_url(url, f"{what} serve_url")


def _obj(raw: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return raw


def parse_labels(raw: Any, what: str = "labels") -> dict[str, str]:
    """Labels are a flat mapping of non-empty strings to strings."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(k, str) and k and isinstance(v, str) for k, v in raw.items()):
        raise ProtocolError(f"{what} must map non-empty strings to strings")
    return dict(raw)


def parse_selector(text: str) -> dict[str, str]:
    """`k=v[,k=v]` -> {k: v}. An empty text selects every node.

    Raises:
        ProtocolError: a term without `=` or with an empty key.
    """
    selector: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("=")
        if not sep or not key.strip():
            raise ProtocolError(f"selector term {term!r} is not k=v")
        selector[key.strip()] = value.strip()
    return selector


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Equality selector: every key must be present with exactly that value."""
    return all(labels.get(k) == v for k, v in selector.items())


# --- enrollment ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnrollRequest:
    token: str
    name: str
    tier: Tier
    labels: dict[str, str]
    profile: str
    emulated: bool = False
    agent_version: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    csr: str = ""
    replace: bool = False  # re-key the node that holds this name already (`strata agent --replace`)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "csr": self.csr,
            "token": self.token,
            "name": self.name,
            "tier": self.tier,
            "labels": self.labels,
            "profile": self.profile,
            "emulated": self.emulated,
            "agent_version": self.agent_version,
            "facts": self.facts,
        }
        if self.replace:  # only when set: a server from before it refuses no request of an agent that does not ask
            body["replace"] = True
        return body


@dataclass(frozen=True)
class EnrollResponse:
    """A node's identity: its id, its fleet certificate (PEM, short-lived) and the fleet CA (PEM); and the
    supply-chain trust it pins: the release public keys (PEM) that must sign every package, and the TUF root metadata
    (JSON text) of the `image` and `director` repositories. Both are empty when the server has no release keys
    (development: the node accepts unsigned packages and says so)."""

    node_id: str
    certificate: str
    ca: str
    not_after: float
    release_keys: tuple[str, ...] = ()
    tuf_roots: Mapping[str, str] = field(default_factory=dict)
    issued_at: float | None = None  # the server's clock at issue: the certificate's life, whatever the node's clock

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "node_id": self.node_id,
            "certificate": self.certificate,
            "ca": self.ca,
            "not_after": self.not_after,
        }
        if self.issued_at is not None:
            body["issued_at"] = self.issued_at
        # Written only when set, so an answer without supply-chain trust has the shape it always had.
        if self.release_keys:
            body["release_keys"] = list(self.release_keys)
        if self.tuf_roots:
            body["tuf_roots"] = dict(self.tuf_roots)
        return body

    @classmethod
    def from_json(cls, raw: Any) -> EnrollResponse:
        what = "enroll response"
        obj = _obj(raw, what)
        not_after = obj.get("not_after")
        if not isinstance(not_after, int | float) or isinstance(not_after, bool):
            raise ProtocolError(f"{what}: 'not_after' must be a number")
        keys = _opt(obj, "release_keys", list, what, [])
        roots = _opt(obj, "tuf_roots", dict, what, {})
        if not all(isinstance(k, str) and k for k in keys):
            raise ProtocolError(f"{what}: 'release_keys' must be PEM strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in roots.items()):
            raise ProtocolError(f"{what}: 'tuf_roots' must map repository names to root metadata text")
        return cls(
            node_id=_req(obj, "node_id", str, what),
            certificate=_req(obj, "certificate", str, what),
            ca=_req(obj, "ca", str, what),
            not_after=float(not_after),
            release_keys=tuple(keys),
            tuf_roots=dict(roots),
            issued_at=_issued_at(obj, not_after, what),
        )


@dataclass(frozen=True)
class CertificateRenewal:
    """A node's new certificate (PEM), when it expires and when it was issued (both on the server's clock)."""

    certificate: str
    not_after: float
    issued_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"certificate": self.certificate, "not_after": self.not_after}
        if self.issued_at is not None:
            body["issued_at"] = self.issued_at
        return body

    @classmethod
    def from_json(cls, raw: Any) -> CertificateRenewal:
        what = "certificate renewal"
        obj = _obj(raw, what)
        not_after = obj.get("not_after")
        if not isinstance(not_after, int | float) or isinstance(not_after, bool):
            raise ProtocolError(f"{what}: 'not_after' must be a number")
        return cls(
            certificate=_req(obj, "certificate", str, what),
            not_after=float(not_after),
            issued_at=_issued_at(obj, not_after, what),
        )


def _issued_at(obj: Mapping[str, Any], not_after: float, what: str) -> float | None:
    """A certificate answer's `issued_at` (absent from a server before it: None).

    Raises:
        ProtocolError: it is not a finite number at or before `not_after`.
    """
    issued = obj.get("issued_at")
    if issued is None:
        return None
    if not isinstance(issued, int | float) or isinstance(issued, bool) or not math.isfinite(issued):
        raise ProtocolError(f"{what}: 'issued_at' must be a number")
    if issued > not_after:
        raise ProtocolError(f"{what}: 'issued_at' must be a time at or before 'not_after'")
    return float(issued)


# --- desired state ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantRef:
    """A package the node may download: its variant facts, package digest and the tar blob that carries it.

    `signature` is the blob id of the package's release signature (an OpenSSF model-signing bundle), present only
    when the package is signed, so the desired states (and ETags) of unsigned packages keep the shape they had.
    """

    id: str
    profile: str
    runtime: str
    precision: str
    digest: str
    blob: str
    size: int
    signature: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "profile": self.profile,
            "runtime": self.runtime,
            "precision": self.precision,
            "digest": self.digest,
            "blob": self.blob,
            "size": self.size,
        }
        if self.signature is not None:
            body["signature"] = self.signature
        return body

    @classmethod
    def from_json(cls, raw: Any) -> VariantRef:
        what = "variant"
        obj = _obj(raw, what)
        ref = cls(
            id=_req(obj, "id", str, what),
            profile=_req(obj, "profile", str, what),
            runtime=_req(obj, "runtime", str, what),
            precision=_req(obj, "precision", str, what),
            digest=_req(obj, "digest", str, what),
            blob=_req(obj, "blob", str, what),
            size=_req(obj, "size", int, what),
            signature=_opt_str(obj, "signature", what),
        )
        if not ref.digest.startswith("sha256:") or not is_hex_sha256(ref.digest[7:]):
            raise ProtocolError(f"variant {ref.id}: digest {ref.digest!r} is not sha256:<hex>")
        if not is_hex_sha256(ref.blob):
            raise ProtocolError(f"variant {ref.id}: blob {ref.blob!r} is not a hex sha256")
        if ref.size < 0:
            raise ProtocolError(f"variant {ref.id}: negative size")
        if ref.signature is not None and not is_hex_sha256(ref.signature):
            raise ProtocolError(f"variant {ref.id}: signature {ref.signature!r} is not a hex sha256")
        return ref


@dataclass(frozen=True)
class DesiredModel:
    """One model that should run on the node, at one version, with the variants it may pick from."""

    name: str
    version: str
    deployment: str
    variants: tuple[VariantRef, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "deployment": self.deployment,
            "variants": [v.to_json() for v in self.variants],
        }

    @classmethod
    def from_json(cls, raw: Any) -> DesiredModel:
        what = "desired model"
        obj = _obj(raw, what)
        variants = _req(obj, "variants", list, what)
        return cls(
            name=_req(obj, "name", str, what),
            version=_req(obj, "version", str, what),
            deployment=_req(obj, "deployment", str, what),
            variants=tuple(VariantRef.from_json(v) for v in variants),
        )


@dataclass(frozen=True)
class LogRequest:
    """An operator's ask for the tail of the node's own log: the node uploads its last `lines` lines, once, to
    `POST /v1/nodes/{node}/log-requests/{id}`. It rides in the desired state because the control plane cannot
    connect to a node (NAT): the node only polls."""

    id: str
    lines: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "lines": self.lines}

    @classmethod
    def from_json(cls, raw: Any) -> LogRequest:
        what = "log request"
        obj = _obj(raw, what)
        request = cls(id=_req(obj, "id", str, what), lines=_req(obj, "lines", int, what))
        if not (0 < len(request.id) <= 64 and request.id.isascii() and request.id.isalnum()):
            raise ProtocolError(f"{what}: id {request.id[:70]!r} is not 1 to 64 letters and digits")
        if not 1 <= request.lines <= MAX_LOG_LINES:
            raise ProtocolError(f"{what}: lines must be between 1 and {MAX_LOG_LINES}")
        return request


@dataclass(frozen=True)
class DesiredState:
    """What the control plane wants a node to run. Its ETag is the digest of its canonical JSON.

    `revoked_certificates` are the hex sha256 of the fleet's revoked certificates that have not expired yet:
    the node refuses peers presenting one on its tier port. Written only when there are any, so a desired state
    without revocations keeps the shape (and ETag) it always had.

    `log_request`, when set, asks the node for the tail of its log (see `LogRequest`); written only when set, so
    agents that predate it never see it, and it is None from servers that predate it.
    """

    node_id: str
    models: tuple[DesiredModel, ...]
    revoked_certificates: frozenset[str] = frozenset()
    log_request: LogRequest | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"node_id": self.node_id, "models": [m.to_json() for m in self.models]}
        if self.revoked_certificates:
            body["revoked_certificates"] = sorted(self.revoked_certificates)
        if self.log_request is not None:
            body["log_request"] = self.log_request.to_json()
        return body

    @property
    def etag(self) -> str:
        return '"' + digest_json(self.to_json()) + '"'

    def model(self, name: str) -> DesiredModel | None:
        for desired in self.models:
            if desired.name == name:
                return desired
        return None

    @classmethod
    def from_json(cls, raw: Any) -> DesiredState:
        what = "desired state"
        obj = _obj(raw, what)
        models = tuple(DesiredModel.from_json(m) for m in _req(obj, "models", list, what))
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ProtocolError("desired state names a model twice")
        revoked = _opt(obj, "revoked_certificates", list, what, [])
        if len(revoked) > MAX_REVOKED_CERTIFICATES or not all(isinstance(h, str) and is_hex_sha256(h) for h in revoked):
            raise ProtocolError(
                f"{what}: 'revoked_certificates' must list at most {MAX_REVOKED_CERTIFICATES} hex sha256 values"
            )
        log_request = obj.get("log_request")
        return cls(
            node_id=_req(obj, "node_id", str, what),
            models=models,
            revoked_certificates=frozenset(revoked),
            log_request=None if log_request is None else LogRequest.from_json(log_request),
        )


# --- observed state --------------------------------------------------------------------------------------


def _number(obj: Mapping[str, Any], key: str, what: str) -> float:
    value = obj.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError(f"{what}: {key!r} must be a number")
    return float(value)


@dataclass(frozen=True)
class ServingCounters:
    """How a model version has served on the node since `since` (its activation, or the agent's start).

    `requests` counts the requests the node took on: answered, or failed by the model or the node; requests refused
    as the caller's fault (malformed) or shed by admission control (the node was busy) count in neither `requests`
    nor `errors`, so `error_rate` is the rollout gates' and the telemetry API's (`MinuteRow` counts those apart).
    `errors` counts the failed ones; `latency_p95_ms` is the 95th percentile of the model's compute time over the
    recent successful requests (None before the first one).
    """

    requests: int
    errors: int
    latency_p95_ms: float | None
    since: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_p95_ms": self.latency_p95_ms,
            "since": self.since,
        }

    @classmethod
    def from_json(cls, raw: Any) -> ServingCounters:
        what = "serving counters"
        obj = _obj(raw, what)
        p95 = obj.get("latency_p95_ms")
        counters = cls(
            requests=_req(obj, "requests", int, what),
            errors=_req(obj, "errors", int, what),
            latency_p95_ms=None if p95 is None else _number(obj, "latency_p95_ms", what),
            since=_number(obj, "since", what),
        )
        if counters.requests < 0 or not 0 <= counters.errors <= counters.requests:
            raise ProtocolError(f"{what}: need 0 <= errors <= requests")
        return counters


ProbationState = Literal["running", "passed"]
PROBATION_STATES: Final[tuple[ProbationState, ...]] = get_args(ProbationState)


@dataclass(frozen=True)
class ModelStatus:
    """A model active on the node: which version and variant, since when, and what it would roll back to.

    `serving` counts how the active version has served since it was activated; `probation` is "running" while
    the node still watches a fresh activation and "passed" after (None for nodes that predate probation).
    """

    name: str
    version: str
    variant: str
    digest: str
    activated_at: float
    previous_version: str | None = None
    previous_digest: str | None = None
    serving: ServingCounters | None = None
    probation: ProbationState | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "variant": self.variant,
            "digest": self.digest,
            "activated_at": self.activated_at,
            "previous_version": self.previous_version,
            "previous_digest": self.previous_digest,
        }
        # Written only when set, so a report from a node without counters has the shape it always had.
        if self.serving is not None:
            body["serving"] = self.serving.to_json()
        if self.probation is not None:
            body["probation"] = self.probation
        return body

    @classmethod
    def from_json(cls, raw: Any) -> ModelStatus:
        what = "model status"
        obj = _obj(raw, what)
        activated = obj.get("activated_at")
        if not isinstance(activated, int | float) or isinstance(activated, bool):
            raise ProtocolError(f"{what}: 'activated_at' must be a number")
        raw_probation = _opt_str(obj, "probation", what)
        probation = None if raw_probation is None else _one_of(raw_probation, PROBATION_STATES, f"{what}: probation")
        serving = obj.get("serving")
        return cls(
            name=_req(obj, "name", str, what),
            version=_req(obj, "version", str, what),
            variant=_req(obj, "variant", str, what),
            digest=_req(obj, "digest", str, what),
            activated_at=float(activated),
            previous_version=_opt_str(obj, "previous_version", what),
            previous_digest=_opt_str(obj, "previous_digest", what),
            serving=None if serving is None else ServingCounters.from_json(serving),
            probation=probation,
        )


# Why a node could not take a version. "health" covers a model that would not load or failed its golden check;
# "probation" one that the node activated, then rolled back by itself; "policy" and "no-variant" say the version
# may not or cannot run on this node at all (the node is out of a rollout, not a failure of it). "signature": the
# package is unsigned or not signed by a release key the node pinned; "tuf": the TUF metadata vouching for it was
# refused (stale, rolled back, mixed, too large, or the director and image repositories disagree); "vault": the
# node's vault worker, which holds the key to its encrypted packages, could not start or stopped answering.
FailureKind = Literal[
    "download", "package", "health", "probation", "policy", "no-variant", "signature", "tuf", "vault", "other",
]  # fmt: skip
FAILURE_KINDS: Final[tuple[FailureKind, ...]] = get_args(FailureKind)
_FAILURE_KIND: Final[Mapping[str, FailureKind]] = {kind: kind for kind in FAILURE_KINDS}


def failure_kind(text: str) -> FailureKind:
    """A reported kind as one this side knows: a kind it does not (from a newer agent) reads as "other", so a report
    is never refused for it."""
    return _FAILURE_KIND.get(text, "other")


@dataclass(frozen=True)
class Failure:
    """A version the node could not take, and why (it keeps serving what it had). The agent keeps the same record
    in its state file, with `attempts` telling it when to try again."""

    model: str
    version: str
    variant: str | None
    reason: str
    at: float
    attempts: int = 1
    kind: FailureKind = "other"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "variant": self.variant,
            "reason": self.reason,
            "at": self.at,
            "attempts": self.attempts,
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, raw: Any) -> Failure:
        what = "failure"
        obj = _obj(raw, what)
        at = obj.get("at")
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise ProtocolError(f"{what}: 'at' must be a number")
        kind = _opt(obj, "kind", str, what, "other")
        return cls(
            model=_req(obj, "model", str, what),
            version=_req(obj, "version", str, what),
            variant=_opt_str(obj, "variant", what),
            reason=_req(obj, "reason", str, what),
            at=float(at),
            attempts=_opt(obj, "attempts", int, what, 1),
            kind=failure_kind(kind),
        )


# What a node says about the packages it accepts: "verified" (release signatures and TUF metadata required) or
# "unverified" (no release keys pinned at enrollment: a development fleet; unsigned packages are accepted).
SupplyMode = Literal["verified", "unverified"]
SUPPLY_MODES: Final[tuple[SupplyMode, ...]] = get_args(SupplyMode)


def _parse_supply(obj: Mapping[str, Any], what: str) -> SupplyMode | None:
    supply = _opt_str(obj, "supply", what)
    return None if supply is None else _one_of(supply, SUPPLY_MODES, f"{what}: supply")


@dataclass(frozen=True)
class NodeStatus:
    """What the agent reports: who it is now, what it runs, what failed, and which desired state it has seen.

    `supply` says whether the node verifies release signatures and TUF metadata (see `SUPPLY_MODES`); None from
    nodes that predate signed packages.
    """

    tier: Tier
    labels: dict[str, str]
    profile: str
    emulated: bool
    agent_version: str
    models: tuple[ModelStatus, ...]
    failures: tuple[Failure, ...] = ()
    desired_etag: str | None = None
    serve_url: str | None = None
    supply: SupplyMode | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "tier": self.tier,
            "labels": self.labels,
            "profile": self.profile,
            "emulated": self.emulated,
            "agent_version": self.agent_version,
            "models": [m.to_json() for m in self.models],
            "failures": [f.to_json() for f in self.failures],
            "desired_etag": self.desired_etag,
            "serve_url": self.serve_url,
        }
        if self.supply is not None:
            body["supply"] = self.supply
        return body

    @classmethod
    def from_json(cls, raw: Any) -> NodeStatus:
        what = "node status"
        obj = _obj(raw, what)
        return cls(
            tier=_one_of(_req(obj, "tier", str, what), TIERS, f"{what}: tier"),
            labels=parse_labels(obj.get("labels"), f"{what} labels"),
            profile=_req(obj, "profile", str, what),
            emulated=_opt(obj, "emulated", bool, what, False),
            agent_version=_opt(obj, "agent_version", str, what, ""),
            models=tuple(ModelStatus.from_json(m) for m in _opt(obj, "models", list, what, [])),
            failures=tuple(Failure.from_json(f) for f in _opt(obj, "failures", list, what, [])),
            desired_etag=_opt_str(obj, "desired_etag", what),
            serve_url=_serve_url(obj, what),
            supply=_parse_supply(obj, what),
        )
