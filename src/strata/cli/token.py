"""`strata token create`: a one-time, expiring enrollment token for a new node; `strata token api`: an operator
token, read-only or admin."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from strata.cli.common import ServerOption, TokenOption, console, parse_duration, parse_label_options
from strata.control_client import ControlClient

app = typer.Typer(help="Enrollment tokens for new nodes.", no_args_is_help=True)


@app.command("create")
def create(
    server: ServerOption = None,
    token: TokenOption = None,
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token stays valid (10m, 1h, 7d).")] = "1h",
    name: Annotated[str | None, typer.Option("--name", help="The only node name it enrolls.")] = None,
    tier: Annotated[str | None, typer.Option("--tier", help="The tier it assigns (device, near-edge, cloud).")] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="A label k=v it assigns (repeatable); the node's own --label cannot differ."),
    ] = None,
) -> None:
    """Print a one-time enrollment token, alone on the last line (for `strata agent --enroll-token`).

    What the token binds is the operator's decision and wins over what the agent asks for; what it leaves unbound
    (tier, labels) is taken from the agent once, at its first enrollment. Later changes: `strata nodes label`."""
    labels = parse_label_options(label) if label else None
    with ControlClient(server, token) as client:
        issued = client.create_enrollment_token(int(parse_duration(ttl)), name, tier, labels)
    console.print(f"enrollment token valid for {ttl}, usable once:")
    typer.echo(issued["token"])


class Scope(StrEnum):
    read = "read"
    admin = "admin"


@app.command("api")
def api(
    server: ServerOption = None,
    token: TokenOption = None,
    scope: Annotated[Scope, typer.Option("--scope", help="read: GET calls only; admin: everything.")] = Scope.read,
) -> None:
    """Print a new operator API token, alone on the last line (for STRATA_TOKEN or --token)."""
    with ControlClient(server, token) as client:
        issued = client.create_api_token(scope.value)
    console.print(f"{issued['scope']} API token:")
    typer.echo(issued["token"])
