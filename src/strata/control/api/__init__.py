"""The `/v1` HTTP API: routers that parse a request, call one service and serialise the answer."""

from __future__ import annotations

from fastapi import FastAPI

from strata.control.api import blobs, deployments, events, nodes, registry, rollouts, supply, system, telemetry
from strata.control.api.errors import install_error_handlers


def install(app: FastAPI) -> None:
    """Add every `/v1` route and the error translation to `app`."""
    install_error_handlers(app)
    for module in (system, nodes, registry, deployments, rollouts, blobs, telemetry, supply, events):
        app.include_router(module.router, prefix="/v1")
    app.include_router(system.metrics_router)
    app.include_router(system.probe_router)
