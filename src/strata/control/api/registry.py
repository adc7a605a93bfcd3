"""Package uploads and the model registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, Request, Response

from strata.control.api.deps import COMMON_ERRORS, Admin, BoundedRoute, Plane, Reader
from strata.control.registry import AddedPackage, ModelInfo, VersionInfo
from strata.control.schemas import ErrorBody, ModelBody, PackageAddedBody, VersionBody
from strata.core.wire import ProtocolError
from strata.trust.release import SignedRelease

router = APIRouter(tags=["registry"], responses=COMMON_ERRORS, route_class=BoundedRoute)

_TAR_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def _pull_from_loop(stream: AsyncIterator[bytes]) -> Iterator[bytes]:
    """The request body as a blocking iterator, for a worker thread: each piece is awaited on the event loop."""

    async def next_piece() -> bytes | None:
        return await anext(stream, None)

    while (chunk := anyio.from_thread.run(next_piece)) is not None:
        if chunk:
            yield chunk


SIGNATURE_HEADER = "x-strata-signature"
RELEASE_ROLE_HEADER = "x-strata-release-role"


def _signature(request: Request) -> SignedRelease | None:
    """The release signature sent with an upload: the bundle and the release role, base64, one header each."""
    bundle, role = request.headers.get(SIGNATURE_HEADER), request.headers.get(RELEASE_ROLE_HEADER)
    if bundle is None and role is None:
        return None
    if bundle is None or role is None:
        raise ProtocolError(f"a signed upload needs both {SIGNATURE_HEADER} and {RELEASE_ROLE_HEADER}")
    return SignedRelease.from_base64(bundle, role)


def _content_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdecimal():
        raise ProtocolError(f"Content-Length {value!r} is not a number")
    return int(value)


@router.post(
    "/packages",
    status_code=201,
    response_model=PackageAddedBody,
    openapi_extra=_TAR_BODY,
    responses={
        200: {"model": PackageAddedBody, "description": "this exact package was registered before"},
        409: {"model": ErrorBody},
        413: {"model": ErrorBody},
    },
)
async def upload_package(request: Request, response: Response, plane: Plane, _admin: Admin) -> AddedPackage:
    """Upload a package tar; it is verified whole before it is stored and registered. Its release signature comes
    in the `X-Strata-Signature` (model-signing bundle) and `X-Strata-Release-Role` (release-signed TUF role)
    headers, base64; a server with release keys refuses a package without one."""
    declared = _content_length(request)
    signature = _signature(request)
    added = await anyio.to_thread.run_sync(
        plane.registry.add_package, _pull_from_loop(request.stream()), declared, signature
    )
    response.status_code = 201 if added.created else 200
    return added


@router.get("/models", response_model=list[ModelBody])
def list_models(plane: Plane, _reader: Reader) -> list[ModelInfo]:
    """Every model with its versions and variants."""
    return plane.registry.list_models()


@router.get("/models/{name}", response_model=ModelBody, responses={404: {"model": ErrorBody}})
def get_model(name: str, plane: Plane, _reader: Reader) -> ModelInfo:
    """One model with its versions and variants."""
    return plane.registry.get_model(name)


@router.get("/models/{name}/versions/{version}", response_model=VersionBody, responses={404: {"model": ErrorBody}})
def get_version(name: str, version: str, plane: Plane, _reader: Reader) -> VersionInfo:
    """One version of a model with its variants."""
    return plane.registry.get_version(name, version)
