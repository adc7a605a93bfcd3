"""Request and response bodies of the `/v1` API as pydantic models, so the OpenAPI document describes them.

The shapes of enrollment, desired state and node status are those of `strata.core.wire`; requests convert to
those dataclasses before a service sees them, and services return dataclasses that these models serialise.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from strata.control.db import TOKEN_NAME_LEN
from strata.control.fleet import MAX_ENROLLMENT_TTL_S, TokenBinding
from strata.core.wire import (
    MAX_LOG_LINES,
    EnrollRequest,
    FailureKind,
    ProbationState,
    SupplyMode,
    Tier,
    failure_kind,
)


class RequestBody(BaseModel):
    """A body a node or an operator sends (and the models nested in one). NaN and the infinities are refused here
    with a 422: Python's JSON parser takes them, JSON itself has no such numbers, and the store writes strict JSON
    (`canonical_json`), so one accepted would fail later, inside a service."""

    model_config = ConfigDict(allow_inf_nan=False)


class HealthBody(BaseModel):
    status: str = Field(description="'ok' when the server answers")
    version: str = Field(description="strata version of the server")
    release_keys: bool = Field(
        False, description="whether the server has release keys: it then accepts only packages signed by one"
    )


# --- enrollment ------------------------------------------------------------------------------------------


class EnrollmentTokenRequest(RequestBody):
    ttl_seconds: int = Field(3600, ge=1, le=MAX_ENROLLMENT_TTL_S, description="how long the token may be used")
    name: str | None = Field(None, max_length=128, description="the only node name this token enrolls")
    tier: Tier | None = Field(None, description="the tier it assigns")
    labels: dict[str, str] | None = Field(None, description="the labels it assigns (whatever the node asks for)")

    def binding(self) -> TokenBinding:
        """What the token binds; unset fields take the enrolling machine's word at its first enrollment."""
        return TokenBinding(name=self.name, tier=self.tier, labels=self.labels)


class ReenrollmentTokenRequest(RequestBody):
    node: str = Field(max_length=128, description="the node's id or name (a revoked node too)")
    ttl_seconds: int = Field(3600, ge=1, le=MAX_ENROLLMENT_TTL_S, description="how long the token may be used")


class NodeAssignRequest(RequestBody):
    labels: dict[str, str | None] | None = Field(
        None, description="labels to set (a value) or remove (null); the others stay"
    )
    tier: Tier | None = None
    accept_profile: bool = Field(False, description="adopt the profile the node's last report claims")


class EnrollmentTokenBody(BaseModel):
    token: str = Field(description="one-time secret; shown only now")
    expires_at: float = Field(description="epoch seconds after which the token no longer enrolls")


class EnrollRequestBody(RequestBody):
    token: str = Field(description="the enrollment token; it is the credential of this call")
    name: str = Field(description="node name, unique in the fleet")
    tier: Tier
    labels: dict[str, str] = Field(default_factory=dict)
    profile: str = Field(description="hardware profile id from the catalog")
    emulated: bool = False
    agent_version: str = Field("", max_length=128)
    facts: dict[str, Any] = Field(default_factory=dict)
    csr: str = Field(description="PEM certificate request over the key the node made for itself", max_length=16384)
    replace: bool = Field(
        False,
        description="re-key the node enrolled under this name (with a token from `strata nodes reenroll`): its "
        "current credential is revoked; without it an enrolled name is a 409",
    )

    def to_core(self) -> EnrollRequest:
        """The wire dataclass the fleet service takes."""
        return EnrollRequest(**self.model_dump())


class EnrollResponseBody(BaseModel):
    node_id: str
    certificate: str = Field(description="the node's fleet certificate (PEM), for mutual TLS from now on")
    ca: str = Field(description="the fleet CA (PEM)")
    not_after: float = Field(description="when the certificate expires (epoch seconds); renew before")
    release_keys: list[str] = Field(
        default_factory=list, description="release public keys (PEM) the node pins; empty in development mode"
    )
    tuf_roots: dict[str, str] = Field(
        default_factory=dict, description="root metadata (JSON text) of the `image` and `director` TUF repositories"
    )
    issued_at: float | None = Field(
        None,
        description="when it was issued (epoch seconds, the server's clock): the node counts the certificate's"
        " life from its receipt on its own clock",
    )


class RenewRequest(RequestBody):
    csr: str = Field(description="PEM certificate request (the node's key, old or new)", max_length=16384)


class CertificateBody(BaseModel):
    certificate: str
    not_after: float
    issued_at: float | None = None


class ApiTokenRequest(RequestBody):
    scope: str = Field("read", json_schema_extra={"enum": ["read", "admin"]})
    name: str | None = Field(
        None, max_length=TOKEN_NAME_LEN, description="what the token is for ('grafana', 'ci'), shown in listings"
    )


class ApiTokenBody(BaseModel):
    token: str = Field(description="the secret; shown only now")
    scope: str
    id: str = Field(description="the token's id: `strata token revoke ID`")
    name: str | None = None


class ApiTokenInfoBody(BaseModel):
    """An operator token as listed: never its secret or the secret's hash."""

    id: str
    name: str | None = Field(description="what the operator called it (none for tokens made before names)")
    scope: str
    created_at: float = Field(description="epoch seconds")
    last_used_at: float | None = Field(
        description="when it last authenticated a request (epoch seconds, recorded every presence flush); "
        "none if never since names and use were recorded"
    )


# --- desired state ---------------------------------------------------------------------------------------


class VariantRefBody(BaseModel):
    id: str
    profile: str
    runtime: str
    precision: str
    digest: str = Field(description="package digest, sha256:<hex> of the canonical manifest")
    blob: str = Field(description="hex sha256 of the package tar, at /v1/blobs/sha256/{blob}")
    size: int = Field(description="bytes of the package tar")
    signature: str | None = Field(
        None, description="hex sha256 of the release signature (model-signing bundle) blob; only when signed"
    )


class DesiredModelBody(BaseModel):
    name: str
    version: str
    deployment: str = Field(description="id of the deployment that decided this version")
    variants: list[VariantRefBody]


class LogRequestBody(BaseModel):
    id: str
    lines: int


class DesiredStateBody(BaseModel):
    node_id: str
    models: list[DesiredModelBody]
    revoked_certificates: list[str] = Field(
        default_factory=list,
        description="hex sha256 (of the DER) of the fleet's revoked certificates that have not expired: refuse peers "
        "presenting one; absent when there are none",
    )
    log_request: LogRequestBody | None = Field(
        None, description="an operator's ask for the tail of the node's log (`strata nodes logs`); absent when none"
    )


# --- observed state ---------------------------------------------------------------------------------------


class ServingCountersBody(RequestBody):
    requests: int = Field(ge=0, description="requests since the version was activated")
    errors: int = Field(ge=0, description="of those, failed ones that were not the caller's fault")
    latency_p95_ms: float | None = Field(None, description="p95 model compute time over recent successes")
    since: float = Field(description="epoch seconds (node clock) when counting began")


class ModelStatusBody(RequestBody):
    name: str
    version: str
    variant: str
    digest: str
    activated_at: float
    previous_version: str | None = None
    previous_digest: str | None = None
    serving: ServingCountersBody | None = None
    probation: ProbationState | None = None


def _known_kind(value: object) -> object:
    """A failure kind this server does not know (from a newer agent) reads as "other", as on the wire."""
    return failure_kind(value) if isinstance(value, str) else value


class FailureBody(RequestBody):
    """`strata.core.wire.Failure`, field by field (tests/unit/test_wire_schemas.py holds the two together)."""

    model: str
    version: str
    variant: str | None = None
    reason: str
    at: float
    attempts: int = 1
    kind: Annotated[FailureKind, BeforeValidator(_known_kind)] = Field(
        "other", description="why the node could not take it (a kind this server does not know reads as other)"
    )


# The most models, and the most failures, one status report may list.
MAX_STATUS_ENTRIES: Final = 256


class NodeStatusBody(RequestBody):
    tier: Tier
    labels: dict[str, str] = Field(default_factory=dict)
    profile: str
    emulated: bool = False
    agent_version: str = Field("", max_length=128)
    # Each entry of a report can add a row to the model history and the event feed: a node may not claim more than
    # it could be given (an agent reports the models it runs and the failures of its current desired state).
    models: list[ModelStatusBody] = Field(default_factory=list, max_length=MAX_STATUS_ENTRIES)
    failures: list[FailureBody] = Field(default_factory=list, max_length=MAX_STATUS_ENTRIES)
    desired_etag: str | None = Field(
        None, max_length=80, description="ETag of the desired state the node last received"
    )
    serve_url: str | None = None
    supply: SupplyMode | None = Field(
        None,
        description="whether the node requires release signatures and TUF metadata (unverified: development)",
    )


class NodeBody(BaseModel):
    id: str
    name: str
    tier: str
    labels: dict[str, str]
    profile: str
    emulated: bool
    agent_version: str
    online: bool = Field(description="seen within the server's online window")
    last_seen: float | None
    models: dict[str, str] = Field(description="model name -> active version, from the last status")
    failures: list[FailureBody]
    serve_url: str | None
    desired_etag: str = Field(description="ETag of the node's current desired state")
    reported_etag: str | None = Field(description="ETag the node last reported having")
    in_sync: bool = Field(description="the node reported the current desired state")
    pins: dict[str, str] = Field(default_factory=dict, description="model -> version a pin holds it on")
    attestation: str | None = Field(None, description="level its last attestation earned; None: not attested")
    attestation_detail: str | None = Field(None, description="the last attestation verdict, in words")
    tpm_ek: str | None = Field(None, description="fingerprint of its registered TPM's endorsement key")
    tpm_pcrs: dict[str, Any] | None = Field(None, description="the PCR values its last good quote covered")
    supply: str | None = Field(
        None, description="verified: the node runs only signed packages vouched for by TUF; unverified: development"
    )
    claims: dict[str, Any] = Field(
        default_factory=dict,
        description="what the node's last report says about itself where it differs from what the control plane "
        "holds (tier, labels: never used; profile: waits for the operator when it would widen what the node gets)",
    )
    slots: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per model, from the last status: the active package (version, variant, digest), when it was "
        "activated, the previous one it can roll back to, and its probation",
    )
    enrolled_at: float | None = Field(None, description="when the node last enrolled")
    certificate_expires_at: float | None = Field(
        None, description="when the node's current certificate expires (one node's view only; it renews it itself)"
    )


class EndpointBody(BaseModel):
    url: str = Field(description="base URL of an Open Inference Protocol server")
    name: str
    tier: str
    node_id: str | None = Field(description="the node behind the URL; null for a configured cloud endpoint")
    online: bool | None = Field(description="whether the control plane sees the node online; null: not a node")


class TopologyBody(BaseModel):
    node_id: str
    name: str
    tier: str
    site: str | None = Field(description="the node's `site` label; a device's parents share it")
    serve_url: str | None = Field(
        description="where the node said it is reached: its mutual-TLS tier listener (https) when it has one, which "
        "other tiers use, else its inference port"
    )
    parents: list[EndpointBody] = Field(description="near-edge nodes to fall back to, in order of preference")
    cloud: list[EndpointBody] = Field(description="cloud endpoints to fall back to last, in order of preference")


# --- registry -------------------------------------------------------------------------------------------


class TensorSpecBody(BaseModel):
    name: str
    datatype: str = Field(description="Open Inference Protocol datatype")
    shape: list[int] = Field(description="-1 marks a dynamic dimension")


class VariantBody(BaseModel):
    id: str
    profile: str
    runtime: str
    precision: str
    digest: str
    blob: str
    size: int
    metrics: dict[str, Any]
    created_at: float
    inputs: list[TensorSpecBody]
    outputs: list[TensorSpecBody]
    signature: str | None = Field(None, description="blob id of the release signature, once signed")


class VersionBody(BaseModel):
    version: str
    created_at: float
    variants: list[VariantBody]


class ModelBody(BaseModel):
    name: str
    created_at: float
    versions: list[VersionBody]


class PackageAddedBody(BaseModel):
    model: str
    version: str
    variant: str
    digest: str
    blob: str
    size: int
    created: bool = Field(description="false when this exact package was registered before")
    signature: str | None = Field(None, description="blob id of the release signature stored with it")


class SignatureRequest(RequestBody):
    bundle: str = Field(description="the model-signing bundle (`PACKAGE.sig`), base64")
    release_role: str = Field(description="the package's release-signed TUF role (`PACKAGE.targets.json`), base64")


class SignatureBody(BaseModel):
    model: str
    version: str
    variant: str
    digest: str
    signature: str = Field(description="blob id of the stored bundle")
    key: str = Field(description="TUF key id of the release key that signed it")
    role_version: int
    expires_at: float = Field(description="when the release role expires (epoch seconds)")


# --- deployments ----------------------------------------------------------------------------------------


class DeploymentRequest(RequestBody):
    model: str
    version: str
    selector: dict[str, str] = Field(default_factory=dict, description="label equality; empty selects every node")
    force: bool = Field(False, description="make it even when the nodes it matches can run none of its variants")


class DeploymentProgressBody(BaseModel):
    node_id: str
    name: str
    state: str = Field(
        description="running, pending (on its way, or offline), failed (the node's reason in `detail`), no-variant "
        "(its profile runs none of the version's variants), excluded (a placement policy), superseded (another "
        "deployment, rollout or pin decides this node)"
    )
    detail: str
    online: bool
    running: str | None = Field(description="the version of the model the node runs now")


class DeploymentBody(BaseModel):
    id: str
    model: str
    version: str
    selector: dict[str, str]
    created_at: float
    matched_nodes: int = Field(description="live nodes the selector matches now")
    runnable_nodes: int = Field(0, description="matched nodes this deployment decides and that can run a variant")
    counts: dict[str, int] = Field(default_factory=dict, description="matched nodes by state")
    done: bool = Field(False, description="no matched node is still pending")
    nodes: list[DeploymentProgressBody] = Field(
        default_factory=list, description="every matched node (one deployment, and a new one's answer)"
    )


class EventBody(BaseModel):
    id: int = Field(description="the feed's cursor: ask for the events after it with `after`")
    at: float
    kind: str
    node: str | None = Field(description="the node's name, when the event is about one")
    node_id: str | None
    model: str | None
    version: str | None
    rollout: str | None
    message: str


# --- rollouts -------------------------------------------------------------------------------------------


class RolloutRequest(RequestBody):
    model: str
    version: str
    selector: dict[str, str] = Field(default_factory=dict, description="label equality; empty selects every node")
    waves: str = Field("1%,10%,50%,100%", description="cumulative wave sizes, percentages or counts")
    max_unavailable: int | None = Field(None, ge=1, description="online nodes updating at once; none: no limit")
    bake_seconds: float = Field(600, ge=0, description="how long a node must stay healthy before its wave passes")
    gates: list[str] = Field(
        default_factory=list, description="METRIC OP NUMBER; each replaces the default gate on its metric"
    )
    on_failure: str = Field("rollback", json_schema_extra={"enum": ["rollback", "pause"]})
    wave_deadline_seconds: float = Field(3600, ge=0, description="offline nodes stop holding a wave after this")
    min_requests: int = Field(20, ge=1, description="requests a node needs before its latency and errors count")
    on_no_data: str = Field(
        "hold",
        json_schema_extra={"enum": ["hold", "pass", "fail"]},
        description="a gate without enough data: hold the wave until its deadline, then fail (hold); pass, saying "
        "it was not judged (pass); fail at once (fail). A gate's own `on-no-data=` wins",
    )
    min_drift_requests: int = Field(
        100, ge=1, description="requests a canary node needs in the drift window before its PSI counts"
    )


class RolloutNodeBody(BaseModel):
    node_id: str
    name: str
    wave: int | None = Field(description="1-based wave; none when kept out")
    state: str = Field(
        description="pending, updating, healthy, failed or excluded; once the rollout has finished, what the node "
        "ended as: healthy or unconfirmed (succeeded), rolled_back or unchanged (rolled back or aborted), failed or "
        "excluded"
    )
    previous_version: str | None
    current_version: str | None
    online: bool
    excluded: str | None = Field(description="which rule, pin or profile keeps the node out")
    failure: str | None
    refused: bool = Field(
        description="kept out because the node itself refused the version once released (its own placement policy "
        "or hardware said no; `excluded` says why): it stays out of this rollout even when nothing else keeps it out"
    )


class RolloutExclusionBody(BaseModel):
    node: str = Field(description="node name")
    reason: str = Field(description="which rule, pin or profile keeps the node out, or why the node refused it")
    refused: bool = Field(
        description="the node itself refused the version once released: it stays out of this rollout for good "
        "(a node kept out for another reason joins the last wave once nothing keeps it out)"
    )


class RolloutBody(BaseModel):
    id: str
    model: str
    version: str
    selector: dict[str, str]
    spec: dict[str, Any]
    status: str = Field(description="running, paused, succeeded, rolled_back or aborted")
    wave: int = Field(description="1-based current wave")
    waves: int
    wave_started_at: float | None
    created_at: float
    finished_at: float | None
    message: str
    counts: dict[str, int] = Field(description="nodes per state (the nodes' `state`)")
    waves_detail: list[dict[str, Any]] = Field(
        description="per wave: its target, its nodes, and how many of them are in each state its nodes can be in"
    )
    gate_results: list[dict[str, Any]] = Field(description="the last evaluation of the gates, with their numbers")
    failed_gate: dict[str, Any] | None
    excluded: list[RolloutExclusionBody] = Field(description="nodes kept out, and why")
    nodes: list[RolloutNodeBody] = Field(default_factory=list)


# --- pins and history ------------------------------------------------------------------------------------


class PinRequest(RequestBody):
    model: str
    version: str
    node: str | None = Field(None, description="a node's name or id")
    selector: dict[str, str] = Field(default_factory=dict, description="label equality, when no node is named")


class PinBody(BaseModel):
    id: str
    model: str
    version: str
    node: str | None
    node_id: str | None
    selector: dict[str, str]
    created_at: float
    matched_nodes: int


class HistoryEventBody(BaseModel):
    at: float = Field(description="when the control plane learned of it")
    node: str
    node_id: str
    kind: str = Field(description="activated, rolled_back or removed")
    version: str | None
    previous_version: str | None
    variant: str | None
    activated_at: float | None = Field(description="the node's own time of the activation")


class NodeLogAsk(RequestBody):
    lines: int = Field(200, ge=1, le=MAX_LOG_LINES, description="how many of its last log lines the node sends")


class NodeLogBody(BaseModel):
    id: str
    node_id: str
    lines: int
    created_at: float
    answered_at: float | None
    state: str = Field(json_schema_extra={"enum": ["pending", "answered"]})
    text: str | None = Field(description="the node's last log lines, once it answered")


class ErrorBody(BaseModel):
    error: str
    code: str


class TelemetryAckBody(BaseModel):
    """The control plane has this batch (stored now, or already before)."""

    seq: int
    stored: bool


class TelemetryMinuteBody(BaseModel):
    node: str
    node_id: str
    model: str
    version: str
    minute: int = Field(description="epoch minute (epoch seconds / 60)")
    time: str = Field(description="the minute's start, ISO 8601 UTC")
    requests: int
    errors: int = Field(description="every failed request, the caller's faults included")
    client_errors: int = Field(
        description="of `errors`, those refused as the caller's fault: malformed, or not fitting the model's signature"
        " (HTTP 400); 0 from nodes that do not tell them apart"
    )
    shed: int = Field(
        description="of `errors`, those shed by admission control: the node was busy and answered 503 at once, the"
        " model never saw them; 0 from nodes that do not tell them apart"
    )
    n: int = Field(description="the requests the latency percentiles rest on")
    p50_ms: float | None = Field(description="median latency; null below 2 requests")
    p95_ms: float | None = Field(description="null below 20 requests")
    p99_ms: float | None = Field(description="null below 100 requests")


class TensorDriftBody(BaseModel):
    tensor: str
    psi: float
    chi_square: float
    p_value: float | None
    samples: int
    drifting: bool


class NodeTelemetryBody(BaseModel):
    node: str
    node_id: str
    model: str
    version: str
    requests: int
    errors: int = Field(description="every failed request, the caller's faults included")
    client_errors: int = Field(description="of `errors`, those refused as the caller's fault (HTTP 400)")
    shed: int = Field(description="of `errors`, those shed by admission control (HTTP 503: the node was busy)")
    error_rate: float = Field(
        description="(errors - client_errors - shed) / (requests - client_errors - shed): of the requests the node"
        " took on, the share the model or the node failed; malformed and shed requests count in neither, as in the"
        " rollout gates' error_rate (0 without such requests)"
    )
    client_error_rate: float = Field(
        description="client_errors / requests: the requests refused as the caller's fault (malformed, or not"
        " fitting the model's signature)"
    )
    shed_rate: float = Field(
        description="shed / requests: the requests shed by admission control, the node too busy to take them"
        " (load, not a failing model)"
    )
    n: int = Field(description="the requests the latency percentiles rest on")
    p50_ms: float | None = Field(description="median latency; null below 2 requests")
    p95_ms: float | None = Field(description="null below 20 requests")
    p99_ms: float | None = Field(description="null below 100 requests")
    drift: list[TensorDriftBody]
    dropped: dict[str, int]


class TelemetryBody(BaseModel):
    model: str
    since: float
    minutes: list[TelemetryMinuteBody]
    nodes: list[NodeTelemetryBody]


class ChallengeBody(BaseModel):
    nonce: str
    expires_at: float


class AttestationRequest(RequestBody):
    report: dict[str, Any] = Field(description="node_id, nonce, agent_code, config, packages, boot_id, time")
    signature: str = Field(description="base64 ECDSA-SHA256 over the report's canonical JSON, with the node key")
    quote: dict[str, Any] | None = Field(
        None,
        description="from a node with a registered TPM: {quoted: base64 TPMS_ATTEST, signature: base64 "
        "TPMT_SIGNATURE, pcrs: {bank: {index: hex}}}, a quote by its AK with sha256(report) as qualifying data",
    )


class AttestationBody(BaseModel):
    attested: bool
    level: str | None
    reason: str
    tpm_registered: bool = Field(False, description="the control plane holds an attestation key of the node's TPM")


class TpmChallengeRequest(RequestBody):
    ek_public: str = Field(description="base64 TPM2B_PUBLIC of the TPM's endorsement key")
    ek_certificate: str | None = Field(description="base64 DER of the EK certificate from the TPM's NV memory")
    ak_public: str = Field(description="base64 TPM2B_PUBLIC of the attestation key (restricted signing)")


class TpmChallengeBody(BaseModel):
    credential_blob: str = Field(description="base64 TPM2B_ID_OBJECT for TPM2_ActivateCredential")
    encrypted_secret: str = Field(description="base64 TPM2B_ENCRYPTED_SECRET for TPM2_ActivateCredential")
    ak_name: str
    expires_at: float


class TpmActivateRequest(RequestBody):
    secret: str = Field(description="base64 of the secret TPM2_ActivateCredential recovered")


class TpmRegisteredBody(BaseModel):
    registered: bool
    ak_name: str
    ek: str = Field(description="sha256 fingerprint of the endorsement key (names one TPM)")
