"""Dependencies of the routers: the control plane, and the caller checked against an access rule."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, Final

from fastapi import Depends, Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from starlette.concurrency import run_in_threadpool
from starlette.types import Message

from strata.control.auth import Access, Principal, authorize
from strata.control.errors import PayloadTooLarge
from strata.control.plane import ControlPlane
from strata.control.schemas import ErrorBody
from strata.core.errors import AuthError

# The error answers every route can give, documented once: all errors have the `ErrorBody` shape.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "missing, unknown or revoked credential"},
    403: {"model": ErrorBody, "description": "the caller may not do this"},
    422: {"model": ErrorBody, "description": "the request is malformed"},
}

# What a route with a JSON body (`BoundedRoute`) reads: every such body (a node's status report, an enrollment, an
# attestation report, a deployment) is a few KiB; the uploads that are larger read their own stream, each with its
# own limit (`read_limited`).
MAX_JSON_BODY_BYTES: Final = 1024 * 1024
# A body sent with no credential at all (an enrollment, whose token is in its body: about 3 KB with its certificate
# request and facts): held in memory before anything is checked, so far less than a credential's share.
MAX_ANONYMOUS_BODY_BYTES: Final = 64 * 1024

_bearer = HTTPBearer(auto_error=False, description="admin token, or a node credential from enrollment")


async def read_limited(request: Request, limit: int, what: str) -> bytes:
    """The request body, refusing more than `limit` bytes before reading it all (`what` names it in the error).

    Raises:
        PayloadTooLarge: the body is (or declares itself) larger than `limit`.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdecimal() and int(declared) > limit:
        raise PayloadTooLarge(f"{what} may be at most {limit} bytes")
    parts, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise PayloadTooLarge(f"{what} may be at most {limit} bytes")
        parts.append(piece)
    return b"".join(parts)


class BoundedRoute(APIRoute):
    """A route whose declared JSON body is read with `read_limited` (MAX_JSON_BODY_BYTES) before FastAPI parses it:
    without it a caller (before any credential is checked: `POST /v1/enroll`; or a node, `PUT .../status`) could
    send a body of any size, held in memory and parsed whole. FastAPI reads a body before the route's dependencies
    check the credential, so a bearer token is checked here first: a request without a fleet certificate or a known
    token may send MAX_ANONYMOUS_BODY_BYTES, and the route then answers as it would (401, or an enrollment). Routes
    that read their request stream themselves declare no body and keep their own limits."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def bounded(request: Request) -> Response:
            limit = MAX_JSON_BODY_BYTES  # a fleet certificate: its chain was verified by TLS
            if client_certificate(request) is None:
                limit, secret = MAX_ANONYMOUS_BODY_BYTES, bearer_secret(request)
                if secret is not None:
                    # unknown: the route says what it needs (an enrollment's token is in its body; others 401)
                    with contextlib.suppress(AuthError):
                        await authenticate_request(request, request.app.state.plane, secret)
                        limit = MAX_JSON_BODY_BYTES
            body = await read_limited(request, limit, "a request body")
            sent = False

            async def replay() -> Message:
                nonlocal sent
                if sent:
                    return await request.receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await handler(Request(request.scope, replay))

        return bounded


async def get_plane(request: Request) -> ControlPlane:
    """The control plane that `create_app` attached to the application."""
    plane: ControlPlane = request.app.state.plane
    return plane


Plane = Annotated[ControlPlane, Depends(get_plane)]


def client_certificate(request: Request) -> bytes | None:
    """The DER of the client certificate the TLS layer verified (the ASGI `tls` extension), or None."""
    tls = request.scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or []
    return ssl.PEM_cert_to_DER_cert(chain[0]) if chain else None


async def get_principal(
    request: Request, plane: Plane, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> Principal:
    """The caller: a node by its fleet certificate (mutual TLS), or an operator by bearer token. From the cache on
    the event loop, or looked up in the database in a worker thread on a miss (every dependency that does no I/O
    is async: a thread hop per dependency would cost an unchanged poll more than the poll itself).

    Raises:
        AuthError: neither credential, or an unknown, revoked or replaced one.
    """
    return await authenticate_request(request, plane, credentials.credentials if credentials else None)


def bearer_secret(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header, or None (as `HTTPBearer(auto_error=False)` reads it)."""
    scheme, value = get_authorization_scheme_param(request.headers.get("authorization"))
    return value if value and scheme.lower() == "bearer" else None


async def authenticate_request(request: Request, plane: ControlPlane, secret: str | None) -> Principal:
    """`get_principal` for a route that reads its request itself (the long poll, see `api.nodes.get_desired`).

    Raises:
        AuthError: neither credential, or an unknown, revoked or replaced one.
    """
    certificate = client_certificate(request)
    if certificate is not None:
        cached = plane.authenticator.certificate_cached(certificate)
        if cached is not None:
            return cached
        return await run_in_threadpool(plane.authenticator.authenticate_certificate, certificate)
    principal = plane.authenticator.authenticate_cached(secret)
    if principal is None:
        principal = await run_in_threadpool(plane.authenticator.authenticate, secret)
    return principal


def _allowed(access: Access) -> Callable[[Request, Principal], Awaitable[Principal]]:
    async def dependency(request: Request, principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        authorize(principal, access, request.path_params.get("node_id"))
        return principal

    return dependency


AnyCaller = Annotated[Principal, Depends(_allowed(Access.ANY))]
Reader = Annotated[Principal, Depends(_allowed(Access.READ))]
Admin = Annotated[Principal, Depends(_allowed(Access.ADMIN))]
SelfOrAdmin = Annotated[Principal, Depends(_allowed(Access.SELF_OR_ADMIN))]
NodeItself = Annotated[Principal, Depends(_allowed(Access.SELF))]
