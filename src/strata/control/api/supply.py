"""The supply chain: TUF metadata of the image and director repositories, and release signatures of variants."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from strata.control.api.deps import COMMON_ERRORS, Admin, AnyCaller, BoundedRoute, Plane, SelfOrAdmin
from strata.control.schemas import ErrorBody, SignatureBody, SignatureRequest
from strata.control.supply import SignatureInfo
from strata.trust.release import SignedRelease

router = APIRouter(tags=["supply"], responses=COMMON_ERRORS, route_class=BoundedRoute)

_METADATA: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}}, "description": "TUF metadata, as signed"},
    404: {"model": ErrorBody},
}
# python-tuf asks for `timestamp.json`, `N.ROLE.json` and percent-encoded role names (`digits%2F1%2Fcpu-...`).
_FILENAME = Path(pattern=r"^[A-Za-z0-9._/-]{1,512}\.json$", description="timestamp.json, N.ROLE.json or ROLE.json")


def _metadata(body: bytes) -> Response:
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/tuf/image/{filename:path}", response_class=Response, responses=_METADATA)
def image_metadata(filename: Annotated[str, _FILENAME], plane: Plane, _caller: AnyCaller) -> Response:
    """Metadata of the image repository (what exists: one release-signed role per package), for any node."""
    return _metadata(plane.supply.metadata(filename))


@router.get("/tuf/director/{node_id}/{filename:path}", response_class=Response, responses=_METADATA)
def director_metadata(
    node_id: str, filename: Annotated[str, _FILENAME], plane: Plane, _caller: SelfOrAdmin
) -> Response:
    """Metadata of the node's director repository (what it should run), for that node only."""
    return _metadata(plane.supply.metadata(filename, node_id))


@router.put(
    "/models/{name}/versions/{version}/variants/{variant}/signature",
    response_model=SignatureBody,
    responses={404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def attach_signature(
    name: str, version: str, variant: str, body: SignatureRequest, plane: Plane, _admin: Admin
) -> SignatureInfo:
    """Attach a release signature (bundle and release role) to a variant uploaded before; it is checked first."""
    signature = SignedRelease.from_base64(body.bundle, body.release_role)
    return plane.supply.attach(name, version, variant, signature)
