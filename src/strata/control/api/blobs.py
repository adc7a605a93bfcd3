"""Package tars by content address, with byte ranges so that agents resume interrupted downloads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import FileResponse

from strata.control.api.deps import COMMON_ERRORS, AnyCaller, BoundedRoute, Plane
from strata.control.schemas import ErrorBody

router = APIRouter(tags=["blobs"], responses=COMMON_ERRORS, route_class=BoundedRoute)


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
def get_blob(
    sha256: Annotated[str, Path(pattern="^[0-9a-f]{64}$")], request: Request, plane: Plane, caller: AnyCaller
) -> FileResponse:
    """A blob (package tar, manifest, chunk or file), for the operator or a node whose desired state needs it."""
    path = plane.blob_access.blob_path(caller, sha256)
    if request.method == "GET":
        plane.blob_access.count_served(served_bytes(path.stat().st_size, request.headers.get("range")))
    return FileResponse(path, media_type="application/octet-stream", headers={"ETag": f'"sha256:{sha256}"'})


def served_bytes(size: int, range_header: str | None) -> int:
    """How many bytes a GET of a blob of `size` bytes sends for this Range header (single ranges only)."""
    if not range_header or not range_header.startswith("bytes=") or "," in range_header:
        return size
    start_text, _, end_text = range_header[6:].partition("-")
    try:
        if not start_text:
            return min(size, int(end_text))
        start = int(start_text)
        end = min(int(end_text), size - 1) if end_text else size - 1
    except ValueError:
        return size
    return max(0, end - start + 1)


# HEAD answers with the same headers (size, ETag) and no body; it is not listed twice in the OpenAPI document.
router.add_api_route(
    "/blobs/sha256/{sha256}", get_blob, methods=["HEAD"], response_class=FileResponse, include_in_schema=False
)
