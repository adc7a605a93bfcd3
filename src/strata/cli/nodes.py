"""`strata nodes list|show|logs|label|accept|reenroll|revoke`: the fleet's inventory, what each node runs, its log,
the identity the operator assigns it, and cutting a node off or bringing it back."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
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
    shown,
)
from strata.control_client import ControlClient
from strata.core.errors import ConfigError, NotFound, TransportError
from strata.core.wire import MAX_LOG_LINES
from strata.core.words import printable

app = typer.Typer(help="The fleet's nodes.", no_args_is_help=True)


def _labels(labels: dict[str, str], separator: str = ",") -> str:
    """Labels as k=v, sorted: joined by "," in a table's cell, by ", " where a line has room."""
    return separator.join(f"{k}={v}" for k, v in sorted(labels.items()))


def _claimed(claims: dict[str, Any]) -> str:
    """What a node claims apart from what the control plane holds: 'tier device; labels site=lab; profile X'."""
    shown = {**claims, "labels": _labels(claims["labels"], ", ") or "none"} if "labels" in claims else claims
    return "; ".join(f"{k} {v}" for k, v in sorted(shown.items()))


def fleet_table(nodes: list[dict[str, Any]], now: float | None = None) -> Table:
    """The fleet as a Rich table: one row a node."""
    table = Table(title="fleet", title_justify="left")
    for column in ("node", "tier", "labels", "profile", "online", "attested", "models", "last seen", "in sync"):
        table.add_column(column)
    for node in sorted(nodes, key=lambda n: n["name"]):
        # Every string from the API is escaped before it meets markup: a node claims what labels (or profile) it
        # likes, and one claiming '[/yellow]' made `strata nodes list` fail with a MarkupError traceback.
        labels = shown(_labels(node.get("labels", {})))
        pins = node.get("pins") or {}
        models = (
            ", ".join(
                shown(f"{k}={v}") + (" [cyan](pinned)[/cyan]" if pins.get(k) == v else "")
                for k, v in sorted(node.get("models", {}).items())
            )
            or "-"
        )
        waiting = {k: v for k, v in pins.items() if node.get("models", {}).get(k) != v}
        if waiting:
            models += " " + ", ".join(
                f"[cyan](pinned to {shown(f'{k}={v}')})[/cyan]" for k, v in sorted(waiting.items())
            )
        failures = node.get("failures") or []
        if failures:
            models += f" [red]({len(failures)} failed)[/red]"
        profile = shown(node.get("profile", "?")) + (" (emulated)" if node.get("emulated") else "")
        claims = node.get("claims") or {}
        if "profile" in claims:
            profile += f" [yellow](claims {shown(str(claims['profile']))}: strata nodes accept)[/yellow]"
        # A claimed tier or labels (only where they differ from the assigned ones) never decide anything.
        tier = shown(node.get("tier", "?"))
        if "tier" in claims:
            tier += f" [yellow](claims {shown(str(claims['tier']))}; not used)[/yellow]"
        if "labels" in claims:
            labels += f" [yellow](claims {shown(_labels(claims['labels'])) or 'none'}; not used)[/yellow]"
        table.add_row(
            shown(node["name"]),
            tier,
            labels,
            profile,
            "[green]yes[/green]" if node.get("online") else "[red]no[/red]",
            shown(node["attestation"]) if node.get("attestation") else "[yellow]no[/yellow]",
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
        NotFound: none (the message says whether a revoked node has that name or id), or more than one.
    """
    matches = [n for n in client.nodes() if node in (n["id"], n["name"])]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise NotFound(f"no single node is named {node!r}")
    try:
        # The node list leaves revoked nodes out; the events of a node are asked of live and revoked ones alike,
        # and refused for a name that no node ever had.
        client.events(node=node, limit=1)
    except NotFound:
        raise NotFound(f"there is no node {node!r} (`strata nodes list` lists the fleet)") from None
    raise NotFound(f"node {node!r} was revoked: `strata nodes reenroll {node}` makes a token that enrolls it again")


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(timestamp))
    return (
        f"{stamp} ({ago(timestamp, now)})" if timestamp <= now else f"{stamp} (in {ago(2 * now - timestamp, now)[:-4]})"
    )


def node_detail(node: dict[str, Any], now: float) -> Group:
    """One node as `strata nodes show` prints it."""
    labels = shown(_labels(node.get("labels", {}), ", ")) or "none"
    claims = node.get("claims") or {}
    claimed = _claimed(claims) or "nothing else"
    attestation = shown(node["attestation"]) if node.get("attestation") else "[yellow]not attested[/yellow]"
    if node.get("attestation_detail"):
        attestation += f" ({shown(node['attestation_detail'])})"
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for key, value in (
        ("node", shown(f"{node['name']} ({node['id']})")),
        ("tier", shown(node.get("tier", "?"))),
        ("labels (assigned)", labels),
        ("claims (its report)", f"[yellow]{shown(claimed)}[/yellow]" if claims else claimed),
        ("profile", shown(node.get("profile", "?")) + (" (emulated)" if node.get("emulated") else "")),
        ("agent", shown(node.get("agent_version") or "?")),
        (
            "online",
            ("[green]yes[/green]" if node.get("online") else "[red]no[/red]")
            + f", seen {ago(node.get('last_seen'), now)}",
        ),
        ("in sync", "yes" if node.get("in_sync") else "no (its desired state changed since its last report)"),
        # what the node reported: its mutual-TLS tier listener (https) where it has one, which other tiers use;
        # else its inference port
        (
            "other tiers reach it at" if str(node.get("serve_url") or "").startswith("https:") else "serves at",
            shown(node.get("serve_url") or "-"),
        ),
        ("enrolled", _when(node.get("enrolled_at"), now)),
        ("certificate expires", _when(node.get("certificate_expires_at"), now) + " (the agent renews it)"),
        ("attestation", attestation),
        ("supply chain", shown(node.get("supply") or "-")),
    ):
        facts.add_row(key, value)
    slots = Table(title="slots", title_justify="left")
    for column in ("model", "active", "variant", "activated", "previous", "probation", "pinned"):
        slots.add_column(column)
    pins = node.get("pins") or {}
    for slot in node.get("slots", []):
        previous = slot.get("previous") or {}
        # Model, versions and variant are what the node reported: text, never markup (as in the failures below).
        slots.add_row(
            shown(slot["model"]),
            shown(slot["active"]["version"]),
            shown(slot["active"]["variant"]),
            _when(slot.get("activated_at"), now),
            shown(previous.get("version") or "-"),
            shown(slot.get("probation") or "-"),
            shown(pins.get(slot["model"], "-")),
        )
    parts: list[RenderableType] = [facts, slots]
    failures = node.get("failures") or []
    if failures:
        failed = Table(title="failures", title_justify="left")
        for column in ("model", "version", "kind", "attempts", "when", "reason"):
            failed.add_column(column)
        for failure in failures:
            failed.add_row(
                shown(failure["model"]),
                shown(failure["version"]),
                shown(failure.get("kind", "other")),
                str(failure.get("attempts", 1)),
                ago(failure.get("at"), now),
                shown(failure["reason"]),
            )
        parts.append(failed)
    return Group(*parts)


@app.command("show")
def show(
    node: Annotated[str, typer.Argument(help="The node's name or id.")],
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One node in detail: what each model's slots hold (active, previous), failures with their reasons, when its
    certificate expires, its attestation, and the labels the operator assigned apart from what it claims."""
    with ControlClient(server, token) as client:
        found = client.node(_resolve(client, node)["id"])
    if as_json:
        print_json(found)
        return
    out.print(node_detail(found, time.time()))


@app.command("logs")
def logs(
    node: Annotated[str, typer.Argument(help="The node's name or id.")],
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=1, max=MAX_LOG_LINES, help="How many of its last log lines.")
    ] = 200,
    wait: Annotated[str, typer.Option("--wait", help="How long to wait for the node to answer (30s, 2m).")] = "30s",
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Print a node's last log lines (its agent's own log). The node is asked through its desired state, so it
    answers on its next poll: at once when it is online, when it comes back otherwise. Needs an admin token."""
    deadline = time.monotonic() + parse_duration(wait)
    with ControlClient(server, token) as client:
        found = _resolve(client, node)
        asked = client.ask_node_logs(found["id"], lines)
        answer = asked
        while answer["state"] != "answered":
            if time.monotonic() >= deadline:
                raise TransportError(
                    f"node {found['name']} did not answer within {wait}"
                    + ("" if found.get("online") else " (it is offline)")
                    + f"; it answers when it next polls: `strata nodes logs {found['name']}` again later"
                )
            time.sleep(0.25)
            answer = client.node_logs(found["id"], asked["id"])
    # The server stores the node's text with its control characters replaced; bidi and zero-width ones it keeps, and
    # an older server kept everything: written out here as on the consoles.
    typer.echo(printable(answer.get("text") or "", keep="\n\t"), nl=False)


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
        elif "=" not in change:
            raise ConfigError(f"{change!r} is neither k=v (sets a label) nor k- (removes it)")
        else:
            edits.update(parse_label_options([change]))
    if not edits and tier is None:
        raise ConfigError("give labels to change (k=v or k-) or --tier")
    with ControlClient(server, token) as client:
        found = _resolve(client, node)
        updated = client.assign_node(found["id"], edits, tier)
    labels = _labels(updated["labels"]) or "none"
    console.print(shown(f"node {updated['name']}: tier {updated['tier']}, labels {labels}"))


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
            console.print(f"node {shown(found['name'])} claims nothing new: its profile is {shown(found['profile'])}")
            return
        updated = client.assign_node(found["id"], accept_profile=True)
    console.print(f"node {shown(updated['name'])}: profile {shown(updated['profile'])}")  # the one it claimed


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
    console.print(f"revoked node {shown(found['name'])} ({shown(found['id'])})")
