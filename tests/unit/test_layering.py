"""The house rules on imports, checked on the source: agent and control never import each other, the
tiered-routing client stays out of both (its gateway borrows only the agent's generic HTTP server and metrics), the
pure halves import no I/O library (not even through the strata modules they import), `core` imports nothing above
it (nor do the package builder and the control-plane client, which sit just above it), the agent never loads the
package builder, and the libraries the CLI runs (the local fleet, the control-plane client) do not import the
CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "strata"
ROUTE_MAY_USE_FROM_AGENT = {"strata.agent.httpd", "strata.agent.metrics"}

# The pure halves: decisions and plain values, no I/O; each driver around them does it (`plan` / `reconciler`,
# `batch_plan` / `scheduler`, `state` / `store`, `rollout_plan` / `rollouts`, `eligibility_rule` / `entries`,
# `route_plan` / `router`, ...).
PURE = (
    "strata.agent.plan",
    "strata.agent.probation",
    "strata.agent.state",
    "strata.agent.batch_plan",
    "strata.control.eligibility_rule",
    "strata.control.desired",
    "strata.control.rollout_plan",
    "strata.control.gates",
    "strata.control.inventory",
    "strata.control.topology",
    "strata.route.route_plan",
    "strata.route.breaker",
    "strata.route.oip_routes",
    "strata.optimize.gate",
    "strata.optimize.select",
    "strata.core.comparison",
    "strata.core.policy",
    "strata.core.modelrefs",
    "strata.core.wire",
)
IO_LIBRARIES = (
    "sqlalchemy",
    "fastapi",
    "starlette",
    "uvicorn",
    "httpx",
    "h11",
    "httptools",
    "grpc",
    "anyio",
    "asyncio",
    "socket",
    "ssl",
    "subprocess",
    "http.client",
    "urllib.request",
)


def names_imported(path: Path) -> set[str]:
    """Every module `path` imports, at any depth, module load or not; `from strata import x` counts as importing
    `strata.x`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "strata":
                names.update(f"strata.{alias.name}" for alias in node.names)
    return names


def imports_of(package: str) -> dict[str, set[str]]:
    """Every strata module each module of `package` (a folder under src/strata, or one module file there) imports
    (see `names_imported`)."""
    found: dict[str, set[str]] = {}
    root = SRC / package
    for path in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
        found[str(path.relative_to(SRC.parent))] = {n for n in names_imported(path) if n.startswith("strata.")}
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


def above_core() -> set[str]:
    """Every top-level package and module of strata but `core` (and the root's `__version__`)."""
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in SRC.glob("*.py") if not p.name.startswith("__")}
    return {f"strata.{name}" for name in packages | modules} - {"strata.core"}


@pytest.mark.parametrize("package", ["core", "control_client.py", "package_build.py"])
def test_core_the_control_client_and_the_package_builder_import_nothing_above_core(package: str) -> None:
    above = above_core()
    assert {"strata.agent", "strata.control", "strata.cli", "strata.sim", "strata.localfleet"} <= above
    offenders = {}
    for module, names in imports_of(package).items():
        bad = {n for n in names if any(n == a or n.startswith(a + ".") for a in above)}
        if bad:
            offenders[module] = bad
    assert offenders == {}


def test_the_local_fleet_does_not_import_the_cli_that_runs_it() -> None:
    (names,) = imports_of("localfleet.py").values()
    assert "strata.control_client" in names
    assert not any(n.startswith("strata.cli") for n in names)


def test_the_agent_never_imports_the_package_builder() -> None:
    offenders = {m: i for m, i in imports_of("agent").items() if "strata.package_build" in i}
    assert offenders == {}


def module_file(name: str) -> Path | None:
    """The source of strata module `name`; None for a name that is not a module (`from strata.x import y`)."""
    path = SRC.parent.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("module", PURE)
def test_the_pure_halves_import_no_io_library_even_through_strata(module: str) -> None:
    assert module_file(module) is not None, f"{module} is listed as pure but does not exist"
    found: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in names_imported(path):
            if imported.startswith("strata."):
                todo.append(imported)
            elif any(imported == lib or imported.startswith(lib + ".") for lib in IO_LIBRARIES):
                found.setdefault(name, set()).add(imported)
    assert found == {}
