"""`strata deploy NAME VERSION --selector k=v`: run a model version on the nodes whose labels match."""

from __future__ import annotations

from typing import Annotated

import typer

from strata.cli.common import JsonOption, ServerOption, TokenOption, console, print_json
from strata.control_client import ControlClient
from strata.core.wire import parse_selector


def deploy(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    selector: Annotated[
        str, typer.Option("--selector", "-l", help="Node labels k=v[,k=v]; every node when empty.")
    ] = "",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a deployment: nodes matching the selector should run NAME at VERSION."""
    labels = parse_selector(selector)
    with ControlClient(server, token) as client:
        created = client.deploy(name, version, labels)
    if as_json:
        print_json(created)
        return
    shown = ",".join(f"{k}={v}" for k, v in labels.items()) or "every node"
    console.print(
        f"deployment {created['id']}: {name} {version} to {shown} ({created.get('matched_nodes', 0)} nodes match now)"
    )
    typer.echo(created["id"])
