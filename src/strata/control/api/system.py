"""`/v1/health`, the OpenAPI document and `/metrics` (behind an operator token), and the only two routes without
any credential: `/healthz` (liveness) and `/readyz` (readiness), for load balancers and Kubernetes."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry

from strata import __version__
from strata.control.api.deps import COMMON_ERRORS, AnyCaller, BoundedRoute, Plane, Reader
from strata.control.errors import StoreError
from strata.control.metrics import CONTENT_TYPE, render
from strata.control.schemas import HealthBody

log = logging.getLogger(__name__)

router = APIRouter(tags=["system"], responses=COMMON_ERRORS, route_class=BoundedRoute)


@router.get("/health", response_model=HealthBody)
async def health(plane: Plane, _caller: AnyCaller) -> dict[str, Any]:
    """Liveness, for any valid admin or node credential; and whether uploads must be signed (`release_keys`)."""
    return {"status": "ok", "version": __version__, "release_keys": plane.supply.enabled}


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _reader: Reader) -> dict[str, Any]:
    """The OpenAPI document of this API."""
    document: dict[str, Any] = request.app.openapi()
    return document


# Outside /v1, where Prometheus looks by default; scrape it with a read token as its bearer credential
# (`authorization: {credentials_file: ...}` in prometheus.yml).
metrics_router = APIRouter(tags=["system"], responses=COMMON_ERRORS, route_class=BoundedRoute)


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
def metrics(request: Request, _reader: Reader) -> Response:
    """Fleet metrics in Prometheus' text format: nodes, versions running, traffic, telemetry ingest."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(render(registry), media_type=CONTENT_TYPE)


# Outside /v1 and without a credential: a load balancer's health check and Kubernetes' probes present none. It
# answers once the lifespan has run (database migrated, CA and TUF keys loaded: uvicorn accepts no request before)
# and says nothing else: no version, no counts, no database state.
READY_CACHE_S = 1.0  # the database is asked at most this often by /readyz

probe_router = APIRouter(tags=["system"], route_class=BoundedRoute)


@probe_router.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """`ok` while this process serves requests; no credential, and nothing else revealed."""
    return "ok"


@probe_router.get("/readyz", response_class=PlainTextResponse, responses={503: {"content": {"text/plain": {}}}})
async def readyz(request: Request, plane: Plane) -> PlainTextResponse:
    """`ok` while this process can serve the API (its database answers, its blob store takes a write: see
    `ControlPlane.check_ready`), else 503 `not ready`; no credential, and nothing else revealed (why is in the
    server's log, once each time it turns not ready)."""
    # One database round trip a second at most, however often the probe is asked (it needs no credential).
    now = time.monotonic()
    checked_at, ready = getattr(request.app.state, "readiness", (-READY_CACHE_S, False))
    if now - checked_at >= READY_CACHE_S:
        try:
            await anyio.to_thread.run_sync(plane.check_ready)
        except StoreError as exc:
            if ready or checked_at < 0:
                log.warning("not ready: %s", exc.message)
            ready = False
        else:
            ready = True
        request.app.state.readiness = (now, ready)
    return PlainTextResponse("ok") if ready else PlainTextResponse("not ready", status_code=503)
