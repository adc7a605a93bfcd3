"""`strata nodes list|label|accept|reenroll|revoke`: the fleet's inventory, what each node runs, the identity the
operator assigns it, and cutting a node off or bringing it back."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from strata.cli.common import (
    JsonOption,
    ServerOption,
    TokenOption,
    ago,
    console,
    out,
    parse_duration,
    parse_label_options,
    print_json,
)
from strata.control_client import ControlClient
from strata.core.errors import ConfigError, NotFound

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
        claims = node.get("claims") or {}
        if "profile" in claims:
            profile += f" [yellow](claims {claims['profile']}: strata nodes accept)[/yellow]"
        if "tier" in claims or "labels" in claims:
            claimed = ", ".join(f"{k} {v}" for k, v in sorted(claims.items()) if k != "profile")
            labels += f" [yellow](claims {claimed}; not used)[/yellow]"
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


def _resolve(client: ControlClient, node: str) -> dict[str, Any]:
    """The one live node whose id or name is `node`.

    Raises:
        NotFound: none, or more than one.
    """
    matches = [n for n in client.nodes() if node in (n["id"], n["name"])]
    if len(matches) != 1:
        raise NotFound(f"no single node is named {node!r}" if matches else f"there is no node {node!r}")
    return matches[0]


@app.command("label")
def label(
    node: Annotated[str, typer.Argument(help="The node's name or id.")],
    changes: Annotated[
        list[str] | None, typer.Argument(help="k=v sets a label, k- removes it (as kubectl label does).")
    ] = None,
    tier: Annotated[str | None, typer.Option("--tier", help="Move the node to this tier.")] = None,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Set or remove a node's labels, or change its tier. Only the operator assigns these: they decide which
    models a node gets, which blobs it may read, and which devices fall back to it."""
    edits: dict[str, str | None] = {}
    for change in changes or []:
        if change.endswith("-") and "=" not in change:
            edits[change[:-1]] = None
        else:
            edits.update(parse_label_options([change]))
    if not edits and tier is None:
        raise ConfigError("give labels to change (k=v or k-) or --tier")
    with ControlClient(server, token) as client:
        found = _resolve(client, node)
        updated = client.assign_node(found["id"], edits, tier)
    labels = ",".join(f"{k}={v}" for k, v in sorted(updated["labels"].items())) or "none"
    console.print(f"node {updated['name']}: tier {updated['tier']}, labels {labels}")


@app.command("accept")
def accept(
    node: Annotated[str, typer.Argument(help="The node's name or id.")],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Adopt the hardware profile a node claims: a node's own report never changes its profile, since placement
    rules may key on it."""
    with ControlClient(server, token) as client:
        found = _resolve(client, node)
        claimed = (found.get("claims") or {}).get("profile")
        if claimed is None:
            console.print(f"node {found['name']} claims nothing new: its profile is {found['profile']}")
            return
        updated = client.assign_node(found["id"], accept_profile=True)
    console.print(f"node {updated['name']}: profile {updated['profile']}")


@app.command("reenroll")
def reenroll(
    node: Annotated[str, typer.Argument(help="The node's name or id (a revoked node too).")],
    ttl: Annotated[str, typer.Option("--ttl", help="How long the token stays valid (10m, 1h, 7d).")] = "1h",
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Print a one-time token that enrolls this node again, alone on the last line: a replacement machine, or a
    revoked node brought back. It keeps the node's id, tier and labels and replaces its credential; no other
    token can enroll a name that is taken."""
    with ControlClient(server, token) as client:
        issued = client.create_reenrollment_token(node, int(parse_duration(ttl)))
    console.print(f"re-enrollment token for node {node}, valid for {ttl}, usable once:")
    typer.echo(issued["token"])


@app.command("revoke")
def revoke(
    node: Annotated[str, typer.Argument(help="The node's name or id.")],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke a node: its certificate stops working at once, and no deployment targets it any more."""
    with ControlClient(server, token) as client:
        found = _resolve(client, node)
        client.revoke_node(found["id"])
    console.print(f"revoked node {found['name']} ({found['id']})")
