"""`/v1/health` and the OpenAPI document (behind an admin token)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from strata import __version__
from strata.control.api.deps import COMMON_ERRORS, Admin, AnyCaller
from strata.control.schemas import HealthBody

router = APIRouter(tags=["system"], responses=COMMON_ERRORS)


@router.get("/health", response_model=HealthBody)
async def health(_caller: AnyCaller) -> dict[str, str]:
    """Liveness, for any valid admin or node credential."""
    return {"status": "ok", "version": __version__}


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, _admin: Admin) -> dict[str, Any]:
    """The OpenAPI document of this API."""
    document: dict[str, Any] = request.app.openapi()
    return document
