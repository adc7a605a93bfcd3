"""Request and response bodies of the `/v1` API as pydantic models, so the OpenAPI document describes them.

The shapes of enrollment, desired state and node status are those of `strata.core.wire`; requests convert to
those dataclasses before a service sees them, and services return dataclasses that these models serialise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from strata.control.fleet import MAX_ENROLLMENT_TTL_S
from strata.core.wire import TIERS, EnrollRequest


class HealthBody(BaseModel):
    status: str = Field(description="'ok' when the server answers")
    version: str = Field(description="strata version of the server")


# --- enrollment ------------------------------------------------------------------------------------------


class EnrollmentTokenRequest(BaseModel):
    ttl_seconds: int = Field(3600, ge=1, le=MAX_ENROLLMENT_TTL_S, description="how long the token may be used")


class EnrollmentTokenBody(BaseModel):
    token: str = Field(description="one-time secret; shown only now")
    expires_at: float = Field(description="epoch seconds after which the token no longer enrolls")


class EnrollRequestBody(BaseModel):
    token: str = Field(description="the enrollment token; it is the credential of this call")
    name: str = Field(description="node name, unique in the fleet; enrolling an existing name re-enrolls that node")
    tier: str = Field(json_schema_extra={"enum": list(TIERS)})
    labels: dict[str, str] = Field(default_factory=dict)
    profile: str = Field(description="hardware profile id from the catalog")
    emulated: bool = False
    agent_version: str = Field("", max_length=128)
    facts: dict[str, Any] = Field(default_factory=dict)

    def to_core(self) -> EnrollRequest:
        """The wire dataclass the fleet service takes."""
        return EnrollRequest(**self.model_dump())


class EnrollResponseBody(BaseModel):
    node_id: str
    credential: str = Field(description="the node's bearer credential; shown only now")


# --- desired state ---------------------------------------------------------------------------------------


class VariantRefBody(BaseModel):
    id: str
    profile: str
    runtime: str
    precision: str
    digest: str = Field(description="package digest, sha256:<hex> of the canonical manifest")
    blob: str = Field(description="hex sha256 of the package tar, at /v1/blobs/sha256/{blob}")
    size: int = Field(description="bytes of the package tar")


class DesiredModelBody(BaseModel):
    name: str
    version: str
    deployment: str = Field(description="id of the deployment that decided this version")
    variants: list[VariantRefBody]


class DesiredStateBody(BaseModel):
    node_id: str
    models: list[DesiredModelBody]


# --- observed state ---------------------------------------------------------------------------------------


class ModelStatusBody(BaseModel):
    name: str
    version: str
    variant: str
    digest: str
    activated_at: float
    previous_version: str | None = None
    previous_digest: str | None = None


class FailureBody(BaseModel):
    model: str
    version: str
    variant: str | None = None
    reason: str
    at: float
    attempts: int = 1


class NodeStatusBody(BaseModel):
    tier: str = Field(json_schema_extra={"enum": list(TIERS)})
    labels: dict[str, str] = Field(default_factory=dict)
    profile: str
    emulated: bool = False
    agent_version: str = Field("", max_length=128)
    models: list[ModelStatusBody] = Field(default_factory=list)
    failures: list[FailureBody] = Field(default_factory=list)
    desired_etag: str | None = Field(
        None, max_length=80, description="ETag of the desired state the node last received"
    )
    serve_url: str | None = None


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
    serve_url: str | None = Field(description="the node's own inference URL, as it reported it")
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


# --- deployments ----------------------------------------------------------------------------------------


class DeploymentRequest(BaseModel):
    model: str
    version: str
    selector: dict[str, str] = Field(default_factory=dict, description="label equality; empty selects every node")


class DeploymentBody(BaseModel):
    id: str
    model: str
    version: str
    selector: dict[str, str]
    created_at: float
    matched_nodes: int = Field(description="live nodes the selector matches now")


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
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


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
    errors: int
    error_rate: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    drift: list[TensorDriftBody]
    dropped: dict[str, int]


class TelemetryBody(BaseModel):
    model: str
    since: float
    minutes: list[TelemetryMinuteBody]
    nodes: list[NodeTelemetryBody]
