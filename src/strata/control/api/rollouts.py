"""Rollouts (wave by wave, with gates), pins, and the history of what ran where."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from strata.control.api.deps import COMMON_ERRORS, Admin, BoundedRoute, Plane, Reader
from strata.control.gates import merge_gates, parse_gate
from strata.control.history import HistoryEvent
from strata.control.pins import PinInfo
from strata.control.rollout_plan import RolloutSpec, parse_waves
from strata.control.rollouts import RolloutView
from strata.control.schemas import ErrorBody, HistoryEventBody, PinBody, PinRequest, RolloutBody, RolloutRequest

router = APIRouter(tags=["rollouts"], responses=COMMON_ERRORS, route_class=BoundedRoute)

_CONFLICT: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody}, 409: {"model": ErrorBody}}


@router.post("/rollouts", status_code=201, response_model=RolloutBody, responses=_CONFLICT)
def create_rollout(body: RolloutRequest, plane: Plane, _admin: Admin) -> RolloutView:
    """Start a rollout; its first wave is chosen and released at once."""
    spec = RolloutSpec(
        waves=parse_waves(body.waves),
        max_unavailable=body.max_unavailable,
        bake_s=body.bake_seconds,
        gates=merge_gates(parse_gate(g) for g in body.gates),
        on_failure=body.on_failure,
        wave_deadline_s=body.wave_deadline_seconds,
        min_requests=body.min_requests,
        on_no_data=body.on_no_data,
        min_drift_requests=body.min_drift_requests,
    )
    return plane.rollouts.create(body.model, body.version, body.selector, spec)


@router.get("/rollouts", response_model=list[RolloutBody])
def list_rollouts(plane: Plane, _reader: Reader) -> list[RolloutView]:
    """Every rollout, newest first (without per-node detail)."""
    return plane.rollouts.list()


@router.get("/rollouts/{rollout_id}", response_model=RolloutBody, responses={404: {"model": ErrorBody}})
def get_rollout(rollout_id: str, plane: Plane, _reader: Reader) -> RolloutView:
    """One rollout with every node's part, the gates' numbers and why nodes are kept out."""
    return plane.rollouts.get(rollout_id)


@router.post("/rollouts/{rollout_id}/pause", response_model=RolloutBody, responses=_CONFLICT)
def pause_rollout(rollout_id: str, plane: Plane, _admin: Admin) -> RolloutView:
    """Stop starting waves; nodes keep what they run."""
    return plane.rollouts.pause(rollout_id)


@router.post("/rollouts/{rollout_id}/resume", response_model=RolloutBody, responses=_CONFLICT)
def resume_rollout(rollout_id: str, plane: Plane, _admin: Admin) -> RolloutView:
    """Carry on a paused rollout."""
    return plane.rollouts.resume(rollout_id)


@router.post("/rollouts/{rollout_id}/abort", response_model=RolloutBody, responses=_CONFLICT)
def abort_rollout(rollout_id: str, plane: Plane, _admin: Admin) -> RolloutView:
    """End the rollout; every node of it returns to the version it had."""
    return plane.rollouts.abort(rollout_id)


@router.post("/pins", status_code=201, response_model=PinBody, responses={404: {"model": ErrorBody}})
def create_pin(body: PinRequest, plane: Plane, _admin: Admin) -> PinInfo:
    """Hold one node, or the nodes a selector matches, on a version (beats deployments and rollouts)."""
    return plane.pins.create(body.model, body.version, body.node, body.selector)


@router.get("/pins", response_model=list[PinBody])
def list_pins(plane: Plane, _reader: Reader) -> list[PinInfo]:
    """Every pin, newest first."""
    return plane.pins.list()


@router.delete("/pins/{pin_id}", status_code=204, responses={404: {"model": ErrorBody}})
def delete_pin(pin_id: str, plane: Plane, _admin: Admin) -> Response:
    """Remove a pin; its nodes follow deployments and rollouts again."""
    plane.pins.delete(pin_id)
    return Response(status_code=204)


@router.get("/models/{name}/history", response_model=list[HistoryEventBody], responses={404: {"model": ErrorBody}})
def model_history(
    name: str,
    plane: Plane,
    _reader: Reader,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
    node: Annotated[str | None, Query(max_length=256, description="only this node's events (name or id)")] = None,
) -> list[HistoryEvent]:
    """Which versions of the model ran where and when, newest first."""
    return plane.history.history(name, limit, node)
