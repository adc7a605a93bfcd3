"""`/v1/health`, the OpenAPI document and `/metrics` (behind an operator token), and the only two routes without
any credential: `/healthz` (liveness) and `/readyz` (readiness), for load balancers and Kubernetes."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry

from strata import __version__
from strata.control.api.deps import COMMON_ERRORS, AnyCaller, Plane, Reader
from strata.control.errors import StoreError
from strata.control.metrics import CONTENT_TYPE, render
from strata.control.schemas import HealthBody

router = APIRouter(tags=["system"], responses=COMMON_ERRORS)


@router.get("/health", response_model=HealthBody)
async def health(_caller: AnyCaller) -> dict[str, str]:
    """Liveness, for any valid admin or node credential."""
    return {"status": "ok", "version": __version__}


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _reader: Reader) -> dict[str, Any]:
    """The OpenAPI document of this API."""
    document: dict[str, Any] = request.app.openapi()
    return document


# Outside /v1, where Prometheus looks by default; scrape it with a read token as its bearer credential
# (`authorization: {credentials_file: ...}` in prometheus.yml).
metrics_router = APIRouter(tags=["system"], responses=COMMON_ERRORS)


@metrics_router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
def metrics(request: Request, _reader: Reader) -> Response:
    """Fleet metrics in Prometheus' text format: nodes, versions running, traffic, telemetry ingest."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(render(registry), media_type=CONTENT_TYPE)


# Outside /v1 and without a credential: a load balancer's health check and Kubernetes' probes present none. It
# answers once the lifespan has run (database migrated, CA and TUF keys loaded: uvicorn accepts no request before)
# and says nothing else: no version, no counts, no database state.
probe_router = APIRouter(tags=["system"])


@probe_router.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """`ok` while this process serves requests; no credential, and nothing else revealed."""
    return "ok"


@probe_router.get("/readyz", response_class=PlainTextResponse, responses={503: {"content": {"text/plain": {}}}})
async def readyz(plane: Plane) -> PlainTextResponse:
    """`ok` while this process can serve the API (its database answers), else 503 `not ready`; no credential, and
    nothing else revealed (why is in the server's log)."""
    try:
        await anyio.to_thread.run_sync(plane.db.ping)
    except StoreError:
        return PlainTextResponse("not ready", status_code=503)
    return PlainTextResponse("ok")
