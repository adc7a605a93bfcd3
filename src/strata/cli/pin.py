"""`strata pin add|list|rm`: hold a node, or a label group, on a version whatever deployments and rollouts say."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from strata.cli.common import JsonOption, ServerOption, TokenOption, console, out, print_json, shown
from strata.control_client import ControlClient
from strata.core.errors import ConfigError
from strata.core.wire import parse_selector
from strata.core.words import plural

app = typer.Typer(help="Pin nodes to a model version.", no_args_is_help=True)


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to hold the nodes on.")],
    node: Annotated[str | None, typer.Option("--node", help="One node, by name or id.")] = None,
    selector: Annotated[str, typer.Option("--selector", "-l", help="Or the nodes these labels k=v[,k=v] match.")] = "",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pin NAME at VERSION on a node or a label group; prints the pin id on its last line."""
    labels = parse_selector(selector)
    if (node is None) == (not labels):
        raise ConfigError("give --node NAME or --selector k=v (one of them)")
    with ControlClient(server, token) as client:
        pin = client.create_pin(name, version, node, labels)
    if as_json:
        print_json(pin)
    else:
        where = shown(pin["node"] or ",".join(f"{k}={v}" for k, v in pin["selector"].items()))
        console.print(
            f"pin {pin['id']}: {name} stays at {version} on {where} ({plural(pin['matched_nodes'], 'node')} now)"
        )
    typer.echo(pin["id"])


@app.command("list")
def list_pins(server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Every pin, newest first."""
    with ControlClient(server, token) as client:
        pins = client.pins()
    if as_json:
        print_json(pins)
        return
    table = Table(title="pins", title_justify="left")
    for column in ("id", "model", "version", "node or selector", "nodes"):
        table.add_column(column)
    for pin in pins:
        where = shown(pin["node"] or ",".join(f"{k}={v}" for k, v in pin["selector"].items()))
        table.add_row(pin["id"], pin["model"], pin["version"], where, str(pin["matched_nodes"]))
    out.print(table)


@app.command("rm")
def remove(
    pin_id: Annotated[str, typer.Argument(help="Pin id.")],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Remove a pin; its nodes follow deployments and rollouts again."""
    with ControlClient(server, token) as client:
        client.delete_pin(pin_id)
    console.print(f"pin {pin_id} removed")
