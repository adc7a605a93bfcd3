"""`strata deploy NAME VERSION (--selector k=v | --all) [--wait]`, `strata deploy list|show|rm`: which version runs
on the nodes whose labels match, and how far it got there."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table
from typer import _click as click  # Typer vendors Click
from typer.core import TyperGroup

from strata.cli.common import (
    JsonOption,
    ServerOption,
    TokenOption,
    ago,
    console,
    did_you_mean,
    out,
    print_json,
    shown,
)
from strata.cli.progress import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    AllOption,
    SelectorOption,
    TimeoutOption,
    WaitOption,
    target_selector,
    watch,
)
from strata.control_client import ControlClient
from strata.core.words import plural


class DeployGroup(TyperGroup):
    """`strata deploy NAME VERSION ...` is `strata deploy create NAME VERSION ...`: the subcommands `list`, `show`
    and `rm` take their names first, anything else is a deployment to create."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            hint = did_you_mean(args[0], (name for name in self.commands if name != "create"))
            if len(args) == 1 and hint:  # `strata deploy lst`: a subcommand mistyped, not a model without version
                raise click.exceptions.UsageError(
                    f"No such command {args[0]!r}. {hint} (A deployment is "
                    "`strata deploy NAME VERSION --selector k=v`.)",
                    ctx,
                )
            args = ["create", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DeployGroup,
    help="Which version of a model runs on which nodes. `strata deploy NAME VERSION --selector k=v` creates one "
    "(`create` may be left out: its options, --selector, --all, --wait, --timeout and --force, are in `strata "
    "deploy create --help`); `list`, `show ID` and `rm ID` manage them.",
    no_args_is_help=True,
)

_STATE_STYLE = {
    "running": "[green]running[/green]",
    "pending": "[yellow]pending[/yellow]",
    "failed": "[red]failed[/red]",
    "no-variant": "[red]no variant[/red]",
    "excluded": "excluded",
    "superseded": "superseded",
}


def _selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "every node"


def _counts_text(deployment: dict[str, Any]) -> str:
    counts = deployment.get("counts") or {}
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "no node matches now"


def _summary(deployment: dict[str, Any]) -> str:
    return (
        f"deployment {shown(deployment['id'])}: {shown(deployment['model'])} {shown(deployment['version'])} to "
        f"{shown(_selector_text(deployment['selector']))} ({shown(_counts_text(deployment))})"
    )


def _nodes_table(deployment: dict[str, Any]) -> Table:
    table = Table(title=_summary(deployment), title_justify="left")
    for column in ("node", "state", "runs", "online", "detail"):
        table.add_column(column)
    for node in deployment.get("nodes", []):
        table.add_row(
            shown(node["name"]),
            _STATE_STYLE.get(node["state"], shown(node["state"])),
            shown(node["running"] or "-"),  # what the node reported
            "yes" if node["online"] else "[red]no[/red]",
            shown(node["detail"]),
        )
    return table


def wait_for_deployment(client: ControlClient, deployment_id: str, timeout: str) -> None:
    """Show the deployment's nodes live until none is pending.

    Raises:
        typer.Exit: a node failed or no node matches (1), or the timeout passed first (124); see
            `strata.cli.progress`.
    """
    final, finished = watch(lambda: client.deployment(deployment_id), _nodes_table, lambda d: bool(d["done"]), timeout)
    counts = final.get("counts") or {}
    if not final.get("nodes"):  # done at once, with nothing done: a mistyped label must not read as success
        console.print(
            f"[red]no node matches {shown(_selector_text(final['selector']))}[/red]: none runs {shown(final['model'])} "
            f"{shown(final['version'])}"
        )
        raise typer.Exit(EXIT_FAILED)
    if not finished:
        console.print(f"[red]timed out[/red] after {timeout}: {plural(counts.get('pending', 0), 'node')} still pending")
        raise typer.Exit(EXIT_TIMEOUT)
    if counts.get("failed"):
        console.print(
            f"[red]{plural(counts['failed'], 'node')} failed[/red] to run {shown(final['model'])} "
            f"{shown(final['version'])}"
        )
        raise typer.Exit(EXIT_FAILED)


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Model version.")],
    selector: SelectorOption = "",
    every_node: AllOption = False,
    force: Annotated[
        bool, typer.Option("--force", help="Make it even when the nodes it matches can run none of its variants.")
    ] = False,
    wait: WaitOption = False,
    timeout: TimeoutOption = "10m",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Nodes matching the selector should run NAME at VERSION (the latest matching deployment wins); prints the
    deployment id on its last line. Refused when nodes match and none has a variant for its hardware. With
    --wait, exits 1 when no node matches (a mistyped label would otherwise wait for nothing and succeed)."""
    labels = target_selector(selector, every_node)
    with ControlClient(server, token) as client:
        created = client.deploy(name, version, labels, force)
        if as_json:
            print_json({k: v for k, v in created.items() if k != "nodes"})
        else:
            console.print(_summary(created))
            for node in created.get("nodes", []):
                if node["state"] in ("no-variant", "excluded"):
                    console.print(f"  [yellow]{node['name']} will not run it:[/yellow] {shown(node['detail'])}")
            if not created.get("nodes"):
                console.print(
                    "  [yellow]no node has these labels now:[/yellow] nodes run it once they enroll or are labelled"
                    " to match (`strata nodes list` shows the labels)"
                )
        typer.echo(created["id"])
        if wait:
            wait_for_deployment(client, str(created["id"]), timeout)


@app.command("list")
def list_deployments(server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Every deployment, newest first, with its nodes counted by state."""
    with ControlClient(server, token) as client:
        deployments = client.deployments()
    if as_json:
        print_json(deployments)
        return
    now = time.time()
    table = Table(title="deployments", title_justify="left")
    for column in ("id", "model", "version", "selector", "nodes", "created"):
        table.add_column(column)
    for deployment in deployments:
        table.add_row(
            str(deployment["id"]),
            shown(deployment["model"]),
            shown(deployment["version"]),
            shown(_selector_text(deployment["selector"])),
            _counts_text(deployment),
            ago(deployment["created_at"], now),
        )
    out.print(table)


@app.command("show")
def show(
    deployment_id: Annotated[str, typer.Argument(help="Deployment id.")],
    wait: WaitOption = False,
    timeout: TimeoutOption = "10m",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Every node the deployment's selector matches: running it, pending, failed (and why), or why it will not."""
    with ControlClient(server, token) as client:
        if wait:
            wait_for_deployment(client, deployment_id, timeout)
            return
        deployment = client.deployment(deployment_id)
    if as_json:
        print_json(deployment)
        return
    out.print(_nodes_table(deployment))


@app.command("rm")
def remove(
    deployment_id: Annotated[str, typer.Argument(help="Deployment id (see strata deploy list).")],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Delete a deployment: its nodes fall back to the next matching one, or drop the model."""
    with ControlClient(server, token) as client:
        client.delete_deployment(deployment_id)
    console.print(f"deleted deployment {deployment_id}")
