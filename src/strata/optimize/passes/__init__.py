"""The optimization passes, each a `strata.optimize.base.Pass`, and the default list in the order they run."""

from __future__ import annotations

from strata.core.errors import ConfigError
from strata.optimize.base import Pass
from strata.optimize.passes.dynamic import DynamicQuantizationPass
from strata.optimize.passes.fp16 import Float16Pass
from strata.optimize.passes.fusion import FusedDynamicQuantizationPass
from strata.optimize.passes.graph import GraphOptimizationPass
from strata.optimize.passes.openvino import OpenVinoPass
from strata.optimize.passes.static import StaticQuantizationPass

__all__ = [
    "DynamicQuantizationPass",
    "Float16Pass",
    "FusedDynamicQuantizationPass",
    "GraphOptimizationPass",
    "OpenVinoPass",
    "StaticQuantizationPass",
    "default_passes",
    "passes_named",
]


def default_passes() -> list[Pass]:
    """Every pass with its default search space."""
    return [
        GraphOptimizationPass(),
        Float16Pass(),
        DynamicQuantizationPass(),
        FusedDynamicQuantizationPass(),
        StaticQuantizationPass(),
        OpenVinoPass(),
    ]


def passes_named(names: list[str] | None) -> list[Pass]:
    """The default passes whose names are in `names` (all of them when None), in the default order.

    Raises:
        ConfigError: a name that is no pass.
    """
    passes = default_passes()
    if names is None:
        return passes
    known = {p.name for p in passes}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ConfigError(f"unknown pass(es) {unknown}; known: {', '.join(p.name for p in passes)}")
    return [p for p in passes if p.name in names]
