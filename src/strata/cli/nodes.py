"""`strata nodes list` and `strata nodes revoke`: the fleet's inventory, what each node runs, and cutting a node
off."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from strata.cli.client import ControlClient
from strata.cli.common import JsonOption, ServerOption, TokenOption, ago, console, out, print_json
from strata.core.errors import NotFound

app = typer.Typer(help="The fleet's nodes.", no_args_is_help=True)


def fleet_table(nodes: list[dict[str, Any]], now: float | None = None) -> Table:
    """The fleet as a Rich table: one row a node."""
    table = Table(title="fleet", title_justify="left")
    for column in ("node", "tier", "labels", "profile", "online", "attested", "models", "last seen", "in sync"):
        table.add_column(column)
    for node in sorted(nodes, key=lambda n: n["name"]):
        labels = ",".join(f"{k}={v}" for k, v in sorted(node.get("labels", {}).items()))
        pins = node.get("pins") or {}
        models = (
            ", ".join(
                f"{k}={v}" + (" [cyan](pinned)[/cyan]" if pins.get(k) == v else "")
                for k, v in sorted(node.get("models", {}).items())
            )
            or "-"
        )
        waiting = {k: v for k, v in pins.items() if node.get("models", {}).get(k) != v}
        if waiting:
            models += " " + ", ".join(f"[cyan](pinned to {k}={v})[/cyan]" for k, v in sorted(waiting.items()))
        failures = node.get("failures") or []
        if failures:
            models += f" [red]({len(failures)} failed)[/red]"
        profile = node.get("profile", "?") + (" (emulated)" if node.get("emulated") else "")
        table.add_row(
            node["name"],
            node.get("tier", "?"),
            labels,
            profile,
            "[green]yes[/green]" if node.get("online") else "[red]no[/red]",
            node.get("attestation") or "[yellow]no[/yellow]",
            models,
            ago(node.get("last_seen"), now),
            "yes" if node.get("in_sync") else "no",
        )
    return table


@app.command("list")
def list_nodes(server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Per node: name, tier, labels, profile, online or not, and the active model versions."""
    with ControlClient(server, token) as client:
        nodes = client.nodes()
    if as_json:
        print_json(nodes)
        return
    out.print(fleet_table(nodes, time.time()))


@app.command("revoke")
def revoke(
    node: Annotated[str, typer.Argument(help="The node's name or id.")],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke a node: its certificate stops working at once, and no deployment targets it any more."""
    with ControlClient(server, token) as client:
        matches = [n for n in client.nodes() if node in (n["id"], n["name"])]
        if len(matches) != 1:
            raise NotFound(f"no single node is named {node!r}" if matches else f"there is no node {node!r}")
        client.revoke_node(matches[0]["id"])
    console.print(f"revoked node {matches[0]['name']} ({matches[0]['id']})")
