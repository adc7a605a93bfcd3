"""Package tars by content address, with byte ranges so that agents resume interrupted downloads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from strata.control.api.deps import COMMON_ERRORS, AnyCaller, Plane
from strata.control.schemas import ErrorBody

router = APIRouter(tags=["blobs"], responses=COMMON_ERRORS)


@router.get(
    "/blobs/sha256/{sha256}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the blob"},
        206: {"description": "the requested byte range (Range: bytes=N- or bytes=N-M)"},
        404: {"model": ErrorBody},
        416: {"description": "the range starts beyond the end of the blob"},
    },
)
def get_blob(sha256: Annotated[str, Path(pattern="^[0-9a-f]{64}$")], plane: Plane, caller: AnyCaller) -> FileResponse:
    """A blob, for the operator or a node whose desired state references it."""
    path = plane.fleet.blob_path(caller, sha256)
    return FileResponse(path, media_type="application/octet-stream", headers={"ETag": f'"sha256:{sha256}"'})


# HEAD answers with the same headers (size, ETag) and no body; it is not listed twice in the OpenAPI document.
router.add_api_route(
    "/blobs/sha256/{sha256}", get_blob, methods=["HEAD"], response_class=FileResponse, include_in_schema=False
)
