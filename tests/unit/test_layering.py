"""The house rules on imports, checked on the source: agent and control never import each other, and the
tiered-routing client stays out of both (its gateway borrows only the agent's generic HTTP server and metrics)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "strata"
ROUTE_MAY_USE_FROM_AGENT = {"strata.agent.httpd", "strata.agent.metrics"}


def imports_of(package: str) -> dict[str, set[str]]:
    """Every strata module each module of `package` imports (at any depth, module load or not)."""
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(SRC.parent))] = {n for n in names if n.startswith("strata.")}
    return found


@pytest.mark.parametrize(("package", "forbidden"), [("agent", "strata.control"), ("control", "strata.agent")])
def test_agent_and_control_never_import_each_other(package: str, forbidden: str) -> None:
    offenders = {m: i for m, i in imports_of(package).items() if any(n.startswith(forbidden) for n in i)}
    assert offenders == {}


def test_route_imports_neither_control_nor_agent_internals() -> None:
    offenders = {}
    for module, names in imports_of("route").items():
        bad = {n for n in names if n.startswith("strata.control") or n.startswith("strata.agent")}
        bad -= ROUTE_MAY_USE_FROM_AGENT
        if bad:
            offenders[module] = bad
    assert offenders == {}
    router = imports_of("route")["strata/route/router.py"]
    assert not any(n.startswith("strata.agent") for n in router)  # the client alone needs no agent code at all
