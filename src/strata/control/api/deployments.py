"""Deployments: pin a model version on the nodes a selector matches."""

from __future__ import annotations

from fastapi import APIRouter, Response

from strata.control.api.deps import COMMON_ERRORS, Admin, BoundedRoute, Plane, Reader
from strata.control.deployments import DeploymentInfo
from strata.control.schemas import DeploymentBody, DeploymentRequest, ErrorBody

router = APIRouter(tags=["deployments"], responses=COMMON_ERRORS, route_class=BoundedRoute)


@router.post(
    "/deployments",
    status_code=201,
    response_model=DeploymentBody,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def create_deployment(body: DeploymentRequest, plane: Plane, _admin: Admin) -> DeploymentInfo:
    """Deploy a version; the latest matching deployment of a model decides what a node runs. Refused (409) when
    nodes match and none of them can run it, unless `force`."""
    return plane.deployments.create(body.model, body.version, body.selector, body.force)


@router.get("/deployments", response_model=list[DeploymentBody])
def list_deployments(plane: Plane, _reader: Reader) -> list[DeploymentInfo]:
    """Every deployment, newest first."""
    return plane.deployments.list()


@router.get("/deployments/{deployment_id}", response_model=DeploymentBody, responses={404: {"model": ErrorBody}})
def get_deployment(deployment_id: str, plane: Plane, _reader: Reader) -> DeploymentInfo:
    """One deployment with every node its selector matches and how far it got there."""
    return plane.deployments.get(deployment_id)


@router.delete("/deployments/{deployment_id}", status_code=204, responses={404: {"model": ErrorBody}})
def delete_deployment(deployment_id: str, plane: Plane, _admin: Admin) -> Response:
    """Delete a deployment; its nodes fall back to the next matching one, or drop the model."""
    plane.deployments.delete(deployment_id)
    return Response(status_code=204)
