"""Dependencies of the routers: the control plane, and the caller checked against an access rule."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from strata.control.auth import Access, Principal, authorize
from strata.control.plane import ControlPlane
from strata.control.schemas import ErrorBody

# The error answers every route can give, documented once: all errors have the `ErrorBody` shape.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing, unknown or revoked credential"},
    403: {"model": ErrorBody, "description": "the caller may not do this"},
    422: {"model": ErrorBody, "description": "the request is malformed"},
}

_bearer = HTTPBearer(auto_error=False, description="admin token, or a node credential from enrollment")


def get_plane(request: Request) -> ControlPlane:
    """The control plane that `create_app` attached to the application."""
    plane: ControlPlane = request.app.state.plane
    return plane


Plane = Annotated[ControlPlane, Depends(get_plane)]


def get_principal(
    plane: Plane, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> Principal:
    """The caller named by the bearer credential.

    Raises:
        AuthError: no bearer credential, or an unknown or revoked one.
    """
    return plane.authenticator.authenticate(credentials.credentials if credentials else None)


def _allowed(access: Access) -> Callable[[Request, Principal], Principal]:
    def dependency(request: Request, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        authorize(principal, access, request.path_params.get("node_id"))
        return principal

    return dependency


AnyCaller = Annotated[Principal, Depends(_allowed(Access.ANY))]
Admin = Annotated[Principal, Depends(_allowed(Access.ADMIN))]
SelfOrAdmin = Annotated[Principal, Depends(_allowed(Access.SELF_OR_ADMIN))]
NodeItself = Annotated[Principal, Depends(_allowed(Access.SELF))]
