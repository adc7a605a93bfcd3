"""Enrollment, the node inventory, each node's desired state (long poll) and its status reports."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from strata.control.api.deps import (
    COMMON_ERRORS,
    Admin,
    AnyCaller,
    BoundedRoute,
    NodeItself,
    Plane,
    Reader,
    SelfOrAdmin,
    authenticate_request,
    bearer_secret,
    client_certificate,
    read_limited,
)
from strata.control.auth import NOT_CURRENT, Access, TokenView, authorize
from strata.control.fleet import INVALID_ENROLLMENT, IssuedToken
from strata.control.inventory import MAX_PAGE, SORT_KEYS, NodeView, page_nodes, parse_sort, select_nodes
from strata.control.nodelogs import MAX_ANSWER_BYTES
from strata.control.plane import ControlPlane
from strata.control.schemas import (
    ApiTokenBody,
    ApiTokenInfoBody,
    ApiTokenRequest,
    AttestationBody,
    AttestationRequest,
    CertificateBody,
    ChallengeBody,
    DesiredStateBody,
    EnrollmentTokenBody,
    EnrollmentTokenRequest,
    EnrollRequestBody,
    EnrollResponseBody,
    ErrorBody,
    NodeAssignRequest,
    NodeBody,
    NodeLogAsk,
    NodeLogBody,
    NodeStatusBody,
    ReenrollmentTokenRequest,
    RenewRequest,
    TopologyBody,
    TpmActivateRequest,
    TpmChallengeBody,
    TpmChallengeRequest,
    TpmRegisteredBody,
)
from strata.control.settings import MAX_WAIT_S
from strata.control.topology import Topology, node_topology
from strata.core.counts import holding
from strata.core.errors import AuthError, Forbidden
from strata.core.wire import EnrollResponse, NodeStatus, ProtocolError, parse_selector
from strata.trust.ca import node_id_of_der

# Long polls one node may hold waiting at once on one server (its agent holds one; a reconnect can overlap it). Past
# that a node's poll is answered at once instead of waiting: a node that opened thousands of polls would otherwise
# hold as many connections for up to MAX_WAIT_S each, until the server ran out of file descriptors.
MAX_WAITING_POLLS_PER_NODE = 4

router = APIRouter(tags=["nodes"], responses=COMMON_ERRORS, route_class=BoundedRoute)
_enrollment_bearer = HTTPBearer(auto_error=False, description="an enrollment token")


@router.post("/enrollment-tokens", status_code=201, response_model=EnrollmentTokenBody)
def create_enrollment_token(body: EnrollmentTokenRequest, plane: Plane, _admin: Admin) -> IssuedToken:
    """Issue a one-time enrollment token; what it binds (name, tier, labels) is the operator's and wins over what
    the enrolling machine asks for. A name already enrolled needs a re-enrollment token instead."""
    return plane.fleet.issue_enrollment_token(body.ttl_seconds, body.binding())


@router.post(
    "/reenrollment-tokens", status_code=201, response_model=EnrollmentTokenBody, responses={404: {"model": ErrorBody}}
)
def create_reenrollment_token(body: ReenrollmentTokenRequest, plane: Plane, _admin: Admin) -> IssuedToken:
    """Issue a one-time token that enrolls one existing node again (a replacement machine, or a revoked node
    brought back): same id, tier and labels, a new credential."""
    return plane.fleet.issue_reenrollment_token(body.node, body.ttl_seconds)


@router.get("/ca", response_class=Response, responses={200: {"content": {"application/x-pem-file": {}}}})
def fleet_ca(
    plane: Plane, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_enrollment_bearer)]
) -> Response:
    """The fleet CA certificate, for a node holding a valid enrollment token. The node checks it against the hash
    its token carries before it trusts this server (the connection itself is not verified yet)."""
    token = credentials.credentials if credentials else ""
    if not token or not plane.fleet.enrollment_token_valid(token):
        raise AuthError(f"{INVALID_ENROLLMENT}: the fleet CA is given to holders of a valid one")
    return Response(plane.pki.ca.cert_pem, media_type="application/x-pem-file")


async def _renewing_node(request: Request, node_id: str, plane: Plane) -> bytes:
    """The certificate (DER) of a node asking for its own renewal. Checked here rather than by `NodeItself`,
    which admits the current certificate only: the fleet CA verified the chain in the handshake, the certificate
    must name this node, and `renew_certificate` decides whether it is the current one or the one just replaced.

    Raises:
        AuthError: no credential, or an unknown one.
        Forbidden: an operator's token, or a certificate naming another node.
    """
    presented = client_certificate(request)
    if presented is None:  # an operator's token (refused as on every node-only route), or nothing
        authorize(await authenticate_request(request, plane, bearer_secret(request)), Access.SELF, node_id)
        raise AuthError("a node renews its certificate over mutual TLS with its current one")
    if node_id_of_der(presented) != node_id:
        raise Forbidden("only the node itself may do this")
    return presented


@router.post("/nodes/{node_id}/certificate", response_model=CertificateBody)
def renew_certificate(
    node_id: str, body: RenewRequest, plane: Plane, presented: Annotated[bytes, Depends(_renewing_node)]
) -> dict[str, Any]:
    """A new certificate for this node, over mutual TLS with its current one (which stops working); asked with the
    one its last renewal replaced, that renewal's answer again (it was lost on the way)."""
    return plane.fleet.renew_certificate(node_id, body.csr, presented).to_json()


@router.get(
    "/nodes/{node_id}/packages/{digest}",
    status_code=204,
    responses={403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
def package_access(
    node_id: str, digest: Annotated[str, Path(pattern="^[0-9a-f]{64}$")], plane: Plane, caller: AnyCaller
) -> Response:
    """204 when the node may read this package (it is in its desired state); asked by the node, an operator, or
    the near-edge node at the node's site, which relays pieces for it."""
    plane.blob_access.package_access(caller, node_id, "sha256:" + digest)
    return Response(status_code=204)


@router.post("/nodes/{node_id}/attestation/challenge", response_model=ChallengeBody)
def attestation_challenge(node_id: str, plane: Plane, _node: NodeItself) -> dict[str, Any]:
    """A one-time nonce for this node's next attestation report (five minutes)."""
    return plane.attestation.challenge(node_id)


@router.post("/nodes/{node_id}/attestation", response_model=AttestationBody)
def attest(node_id: str, body: AttestationRequest, request: Request, plane: Plane, _node: NodeItself) -> dict[str, Any]:
    """Check a report of what the node runs, signed with its node key, and record whether it is attested."""
    certificate = plane.attestation.require_certificate(client_certificate(request))
    verdict = plane.attestation.submit(node_id, body.report, body.signature, certificate, body.quote)
    return {
        "attested": verdict.attested,
        "level": verdict.level,
        "reason": verdict.reason,
        "tpm_registered": verdict.tpm_registered,
    }


@router.post("/nodes/{node_id}/tpm/challenge", response_model=TpmChallengeBody)
def tpm_challenge(node_id: str, body: TpmChallengeRequest, plane: Plane, _node: NodeItself) -> dict[str, Any]:
    """Check this node's TPM (EK certificate from a trusted manufacturer CA, a restricted AK) and send a
    credential to activate: a secret only that TPM can recover, and only for that AK (five minutes)."""
    return plane.attestation.tpm_challenge(node_id, body.ek_public, body.ek_certificate, body.ak_public)


@router.post("/nodes/{node_id}/tpm/activate", response_model=TpmRegisteredBody)
def tpm_activate(node_id: str, body: TpmActivateRequest, plane: Plane, _node: NodeItself) -> dict[str, Any]:
    """Register the AK when the node recovered the secret; its reports must be quoted from then on."""
    return plane.attestation.tpm_activate(node_id, body.secret)


@router.post("/api-tokens", status_code=201, response_model=ApiTokenBody)
def create_api_token(body: ApiTokenRequest, plane: Plane, _admin: Admin) -> dict[str, str | None]:
    """A new operator token, read-only (`read`: GET calls only) or `admin`, optionally named."""
    issued, secret = plane.authenticator.issue_token(body.scope, body.name)
    return {"token": secret, "scope": issued.scope, "id": issued.id, "name": issued.name}


@router.get("/api-tokens", response_model=list[ApiTokenInfoBody])
def list_api_tokens(plane: Plane, _admin: Admin) -> list[TokenView]:
    """Every operator token not revoked, oldest first: id, name, scope, when made and last used; never a secret."""
    return plane.authenticator.list_tokens()


@router.delete(
    "/api-tokens/{token_id}", status_code=204, responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}}
)
def revoke_api_token(token_id: str, plane: Plane, _admin: Admin) -> Response:
    """Revoke an operator token: refused at once by this server, and by every replica within seconds. The last admin
    token is not revoked (409): issue another admin token first."""
    plane.authenticator.revoke_token(token_id)
    return Response(status_code=204)


@router.post("/enroll", status_code=201, response_model=EnrollResponseBody, response_model_exclude_defaults=True)
def enroll(body: EnrollRequestBody, plane: Plane) -> EnrollResponse:
    """Enroll a node with an enrollment token (the token in the body is the credential of this call); the answer
    carries the release keys and TUF roots the node pins (when the server has release keys)."""
    return plane.supply.enrollment_answer(plane.fleet.enroll(body.to_core()))


@router.get("/nodes", response_model=list[NodeBody])
def list_nodes(
    plane: Plane,
    _reader: Reader,
    response: Response,
    selector: Annotated[str, Query(description="only nodes with these labels: k=v[,k=v]")] = "",
    sort: Annotated[
        str | None, Query(description=f"one of {sorted(SORT_KEYS)}; prefix '-' for descending (default: name)")
    ] = None,
    offset: Annotated[int, Query(ge=0, description="skip this many nodes of the sorted list")] = 0,
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE, description="at most this many nodes (default: all)")] = None,
) -> list[NodeView]:
    """Every node that is not revoked (by name), or one page of them: the `X-Total-Count` header counts the nodes
    the selector matches, whatever the page."""
    order = parse_sort(sort)
    views = select_nodes(plane.fleet.list_nodes(), parse_selector(selector))
    response.headers["X-Total-Count"] = str(len(views))
    if limit is None and offset == 0 and sort is None:
        return views  # already by name
    return page_nodes(views, order, offset, limit)


@router.get("/nodes/{node_id}", response_model=NodeBody, responses={404: {"model": ErrorBody}})
def get_node(node_id: str, plane: Plane, _caller: SelfOrAdmin) -> NodeView:
    """One node, for the operator or the node itself."""
    return plane.fleet.get_node(node_id)


@router.patch("/nodes/{node_id}", response_model=NodeBody, responses={404: {"model": ErrorBody}})
def assign_node(node_id: str, body: NodeAssignRequest, plane: Plane, _admin: Admin) -> NodeView:
    """The operator changes a node's labels or tier, or accepts the profile it claims: these decide placement,
    blob access and topology, and only the operator sets them."""
    return plane.fleet.assign(node_id, body.labels, body.tier, body.accept_profile)


@router.delete("/nodes/{node_id}", status_code=204, responses={404: {"model": ErrorBody}})
def revoke_node(node_id: str, plane: Plane, _admin: Admin) -> Response:
    """Revoke a node: its credential stops working and no deployment targets it."""
    plane.fleet.revoke(node_id)
    return Response(status_code=204)


@router.get(
    "/nodes/{node_id}/desired",
    response_class=Response,
    responses={
        200: {"model": DesiredStateBody, "description": "the desired state; its ETag header identifies it"},
        304: {"description": "unchanged since If-None-Match, after waiting up to `wait` seconds"},
        404: {"model": ErrorBody},
    },
    # The parameters are read from the request by the handler (see its docstring) and documented here.
    openapi_extra={
        "parameters": [
            {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}},
            {
                "name": "wait",
                "in": "query",
                "description": "seconds to hold an unchanged poll",
                "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_S, "default": 0},
            },
            {"name": "if-none-match", "in": "header", "schema": {"type": "string"}},
        ]
    },
)
async def get_desired(request: Request) -> Response:
    """GET /v1/nodes/{node_id}/desired?wait=SECONDS, with If-None-Match: what the node should run (its JSON
    `DesiredStateBody`, and an ETag header that identifies it). With If-None-Match, an unchanged answer waits (long
    poll, up to `wait` seconds, at most MAX_WAIT_S), then is a 304. For the node itself or an operator.

    It reads its parameters from the request itself instead of declaring them: every node of the fleet holds
    this poll, and a deploy answers all of them and takes their next polls at once; FastAPI's parameter and
    dependency solving was the largest part of that burst's CPU. It checks the caller exactly as
    `deps.SelfOrAdmin` does, and errors answer in the app's one JSON shape.

    Raises:
        AuthError: no valid credential. Forbidden: another node's state. NotFound: no such node.
        ProtocolError: `wait` is not a number of seconds in range (422).
    """
    plane: ControlPlane = request.app.state.plane
    node_id: str = request.path_params["node_id"]
    caller = await authenticate_request(request, plane, bearer_secret(request))
    authorize(caller, Access.SELF_OR_ADMIN, node_id)
    wait = _wait_seconds(request.query_params.get("wait"))
    waiting: dict[str, int] = request.app.state.waiting_polls
    counted = caller.node_id == node_id and wait > 0  # an operator's poll is not the node's
    if counted and waiting.get(node_id, 0) >= MAX_WAITING_POLLS_PER_NODE:
        wait, counted = 0.0, False  # over its share: answered at once
    with holding(waiting, node_id) if counted else contextlib.nullcontext():
        poll = await plane.fleet.poll_desired(node_id, request.headers.get("if-none-match"), wait)
    if poll.document.revoked and caller.node_id == node_id:
        # Revoked while its poll waited: the node is cut off now, not told to unload what it serves.
        raise AuthError(NOT_CURRENT)
    headers = {"ETag": poll.document.etag, "Cache-Control": "no-cache"}
    if not poll.changed:
        return Response(status_code=304, headers=headers)
    return Response(poll.document.body, media_type="application/json", headers=headers)


def _wait_seconds(raw: str | None) -> float:
    """The `wait` query parameter: seconds, 0 to MAX_WAIT_S (default 0).

    Raises:
        ProtocolError: not a finite number in that range.
    """
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        raise ProtocolError(f"query.wait: {raw[:40]!r} is not a number of seconds") from None
    if not 0 <= wait <= MAX_WAIT_S:  # NaN fails both comparisons
        raise ProtocolError(f"query.wait: must be between 0 and {MAX_WAIT_S:g} seconds")
    return wait


@router.put("/nodes/{node_id}/status", status_code=204, responses={404: {"model": ErrorBody}})
def put_status(node_id: str, body: NodeStatusBody, plane: Plane, _node: NodeItself) -> Response:
    """The node reports what it runs; stored only when it changed."""
    plane.fleet.report_status(node_id, NodeStatus.from_json(body.model_dump()))
    return Response(status_code=204)


@router.get("/nodes/{node_id}/topology", response_model=TopologyBody, responses={404: {"model": ErrorBody}})
def get_topology(node_id: str, plane: Plane, _caller: SelfOrAdmin) -> Topology:
    """Where the node's inference falls back to: its parent near-edge nodes (same `site` label), then the cloud
    endpoints. For the node itself (its gateway) or the operator."""
    candidates = plane.fleet.list_nodes(tiers=("near-edge", "cloud"))
    return node_topology(plane.fleet.get_node(node_id), candidates, plane.settings.cloud_endpoints)


_LOG_BODY = {
    "requestBody": {"required": True, "content": {"text/plain": {"schema": {"type": "string"}}}},
}


@router.post(
    "/nodes/{node_id}/log-requests", status_code=201, response_model=NodeLogBody, responses={404: {"model": ErrorBody}}
)
def ask_node_logs(node_id: str, body: NodeLogAsk, plane: Plane, _admin: Admin) -> dict[str, Any]:
    """Ask a node for the tail of its log. The node cannot be reached (it only polls), so the ask rides in its
    desired state and wakes its long poll; read the answer at `GET .../log-requests/{request_id}`. Admin only:
    a log may hold what a read token should not see."""
    return plane.node_logs.ask(node_id, body.lines)


@router.post(
    "/nodes/{node_id}/log-requests/{request_id}",
    status_code=204,
    responses={404: {"model": ErrorBody}, 413: {"model": ErrorBody}},
    openapi_extra=_LOG_BODY,
)
async def answer_node_logs(
    node_id: str, request_id: str, request: Request, plane: Plane, _node: NodeItself
) -> Response:
    """The node's answer to its own log request: its last log lines as UTF-8 text (at most about 1 MiB)."""
    body = await read_limited(request, MAX_ANSWER_BYTES, "a log upload")
    text = body.decode("utf-8", errors="replace")
    await anyio.to_thread.run_sync(plane.node_logs.answer, node_id, request_id, text)
    return Response(status_code=204)


@router.get(
    "/nodes/{node_id}/log-requests/{request_id}", response_model=NodeLogBody, responses={404: {"model": ErrorBody}}
)
def get_node_logs(node_id: str, request_id: str, plane: Plane, _admin: Admin) -> dict[str, Any]:
    """A log request: `pending` until the node answers, then `answered` with its text. Admin only."""
    return plane.node_logs.get(node_id, request_id)
