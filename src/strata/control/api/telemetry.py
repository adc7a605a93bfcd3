"""Telemetry: nodes upload batches (stored exactly once); operators query traffic, latency and drift."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Query, Request

from strata.control.api.deps import COMMON_ERRORS, BoundedRoute, NodeItself, Plane, Reader, read_limited
from strata.control.errors import TooManyRequests
from strata.control.schemas import TelemetryAckBody, TelemetryBody
from strata.control.telemetry import MAX_QUERY_ROWS, MAX_UPLOAD_BYTES
from strata.core.counts import holding

router = APIRouter(tags=["telemetry"], responses=COMMON_ERRORS, route_class=BoundedRoute)

_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/vnd.strata.telemetry+zstd": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# A node sends one batch at a time (the next after the last's acknowledgement); two allow a resend while the server
# still works on the first. A node that sends more at once (its certificate, a modified agent) has each parsed at the
# server's cost: the rest are answered 429 at once, and an honest node's uploader tries again later.
MAX_UPLOADS_PER_NODE = 2


@router.post("/nodes/{node_id}/telemetry", response_model=TelemetryAckBody, openapi_extra=_BATCH_BODY)
async def upload_telemetry(node_id: str, request: Request, plane: Plane, _node: NodeItself) -> dict[str, Any]:
    """Store one telemetry batch of this node; a batch already stored is acknowledged, not stored again."""
    uploads: dict[str, int] = request.app.state.telemetry_uploads
    if uploads.get(node_id, 0) >= MAX_UPLOADS_PER_NODE:
        raise TooManyRequests(f"this node has {MAX_UPLOADS_PER_NODE} telemetry uploads under way; send one at a time")
    with holding(uploads, node_id):
        body = await read_limited(request, MAX_UPLOAD_BYTES, "a telemetry batch")
        result = await anyio.to_thread.run_sync(plane.telemetry.ingest, node_id, body)
    return {"seq": result.seq, "stored": result.stored}


@router.get("/telemetry", response_model=TelemetryBody)
def query_telemetry(
    plane: Plane,
    _reader: Reader,
    model: Annotated[str, Query(description="model name")],
    version: Annotated[str | None, Query(description="only this version")] = None,
    node: Annotated[str | None, Query(description="only this node (by name)")] = None,
    since: Annotated[float, Query(gt=0, le=90 * 86400, description="seconds back from now")] = 3600,
) -> dict[str, Any]:
    """Requests, errors and latency per node and minute, and per node and version with drift; a query matching
    more than MAX_QUERY_ROWS stored rows is refused (422): ask for one node, one version or a shorter time."""
    start = plane.settings.clock() - since
    minutes, nodes = plane.telemetry.minutes(model, version, node, start, MAX_QUERY_ROWS)
    return {
        "model": model,
        "since": start,
        "minutes": [
            {**asdict(m), "time": dt.datetime.fromtimestamp(m.minute * 60, dt.UTC).isoformat()} for m in minutes
        ],
        "nodes": [asdict(n) for n in nodes],
    }
