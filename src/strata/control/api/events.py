"""The fleet's event feed: enrollments, activations, failures, rollbacks, revocations, deployments, rollouts, gates."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from strata.control.api.deps import COMMON_ERRORS, BoundedRoute, Plane, Reader
from strata.control.events import EVENT_KINDS, MAX_EVENTS, Event
from strata.control.schemas import EventBody

router = APIRouter(tags=["events"], responses=COMMON_ERRORS, route_class=BoundedRoute)


@router.get("/events", response_model=list[EventBody])
def list_events(
    plane: Plane,
    _reader: Reader,
    since: Annotated[float | None, Query(description="only events at or after this time (epoch seconds)")] = None,
    after: Annotated[
        int | None, Query(description="only events after this id, the first `limit` of them (to follow the feed)")
    ] = None,
    kind: Annotated[list[str] | None, Query(description=f"only these kinds: {', '.join(EVENT_KINDS)}")] = None,
    node: Annotated[str | None, Query(description="only events about this node (name or id)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_EVENTS)] = 1000,
) -> list[Event]:
    """Events oldest first: the last `limit` (since `since`), or the first `limit` after id `after`."""
    return plane.events.list(since, after, kind or (), node, limit)
