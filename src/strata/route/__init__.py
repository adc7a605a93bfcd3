"""Tiered inference: send Open Inference Protocol requests to this node, else its parent near-edge node, else
the cloud, with a circuit breaker and health per target and a latency budget per request.

    async with Router([Target("local", "http://127.0.0.1:8080"), Target("cloud", "https://oip.example")]) as r:
        answer = await r.infer("digits", {"X": x}, budget_ms=50)
        answer.outputs["label"], answer.served_by  # "local", "parent" or "cloud"

`strata gateway` serves the same routing as a local OIP endpoint (`strata.route.gateway`).
"""

from strata.route.breaker import Breaker, BreakerConfig, BreakerState
from strata.route.route_plan import Attempt, TargetView, Verdict, classify, next_attempt
from strata.route.router import (
    BUDGET,
    ROUTE,
    SERVED_BY,
    AttemptRecord,
    InferAnswer,
    NoTierAnswered,
    RoutedResponse,
    Router,
    RouterConfig,
    Target,
)
from strata.route.topology import Topology, fetch_topology, parse_topology

__all__ = [
    "BUDGET",
    "ROUTE",
    "SERVED_BY",
    "Attempt",
    "AttemptRecord",
    "Breaker",
    "BreakerConfig",
    "BreakerState",
    "InferAnswer",
    "NoTierAnswered",
    "RoutedResponse",
    "Router",
    "RouterConfig",
    "Target",
    "TargetView",
    "Topology",
    "Verdict",
    "classify",
    "fetch_topology",
    "next_attempt",
    "parse_topology",
]
