"""`strata sim --nodes N --scenario FILE [--seed S] [--json]`: run a fleet scenario against a virtual clock."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from strata.cli.common import JsonOption, console, out, print_json
from strata.core.words import plural


def sim(
    scenario: Annotated[
        Path, typer.Option("--scenario", help="Scenario file (YAML; see scenarios/).", exists=True, dir_okay=False)
    ],
    nodes: Annotated[int | None, typer.Option("--nodes", help="Virtual nodes (default: the scenario's).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed (default: the scenario's).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Simulate a rollout over a virtual fleet with the real planner and agent code; print what it came to."""
    from strata.sim import load_scenario, run_scenario

    if nodes is not None and nodes < 1:
        from strata.core.errors import ConfigError

        raise ConfigError("--nodes must be at least 1")
    loaded = load_scenario(scenario)
    if not as_json:
        console.print(f"simulating {loaded.name} with {plural(nodes or loaded.nodes, 'node')} ...")
    summary = run_scenario(loaded, nodes, seed)
    if as_json:
        print_json(summary)
        return
    table = Table(
        title=f"{summary['scenario']} ({plural(summary['nodes'], 'node')}, seed {summary['seed']})",
        title_justify="left",
    )
    table.add_column("")
    table.add_column("value")
    for key, value in summary.items():
        if key in ("scenario", "nodes", "seed"):
            continue
        if key == "failed_gate" and value:
            value = f"{value['gate']} = {value['value']:.4g} in wave {value['wave'] + 1}: {value['detail']}"
        elif isinstance(value, float):
            value = f"{value:,.6g}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        table.add_row(key.replace("_", " "), str(value))
    out.print(table)
