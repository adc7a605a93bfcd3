"""Enrollment, the node inventory, each node's desired state (long poll) and its status reports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from strata.control.api.deps import COMMON_ERRORS, Admin, NodeItself, Plane, SelfOrAdmin
from strata.control.fleet import IssuedToken, NodeView
from strata.control.schemas import (
    DesiredStateBody,
    EnrollmentTokenBody,
    EnrollmentTokenRequest,
    EnrollRequestBody,
    EnrollResponseBody,
    ErrorBody,
    NodeBody,
    NodeStatusBody,
    TopologyBody,
)
from strata.control.settings import MAX_WAIT_S
from strata.control.topology import Topology, node_topology
from strata.core.wire import EnrollResponse, NodeStatus

router = APIRouter(tags=["nodes"], responses=COMMON_ERRORS)


@router.post("/enrollment-tokens", status_code=201, response_model=EnrollmentTokenBody)
def create_enrollment_token(body: EnrollmentTokenRequest, plane: Plane, _admin: Admin) -> IssuedToken:
    """Issue a one-time enrollment token."""
    return plane.fleet.issue_enrollment_token(body.ttl_seconds)


@router.post("/enroll", status_code=201, response_model=EnrollResponseBody)
def enroll(body: EnrollRequestBody, plane: Plane) -> EnrollResponse:
    """Enroll a node with an enrollment token (the token in the body is the credential of this call)."""
    return plane.fleet.enroll(body.to_core())


@router.get("/nodes", response_model=list[NodeBody])
def list_nodes(plane: Plane, _admin: Admin) -> list[NodeView]:
    """Every node that is not revoked."""
    return plane.fleet.list_nodes()


@router.get("/nodes/{node_id}", response_model=NodeBody, responses={404: {"model": ErrorBody}})
def get_node(node_id: str, plane: Plane, _caller: SelfOrAdmin) -> NodeView:
    """One node, for the operator or the node itself."""
    return plane.fleet.get_node(node_id)


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
)
async def get_desired(
    node_id: str,
    plane: Plane,
    _caller: SelfOrAdmin,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to hold an unchanged poll")] = 0,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """What the node should run. With If-None-Match, an unchanged answer waits (long poll), then is a 304."""
    poll = await plane.fleet.poll_desired(node_id, if_none_match, wait)
    headers = {"ETag": poll.document.etag, "Cache-Control": "no-cache"}
    if not poll.changed:
        return Response(status_code=304, headers=headers)
    return Response(poll.document.body, media_type="application/json", headers=headers)


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
