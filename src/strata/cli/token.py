"""`strata token create`: a one-time, expiring enrollment token for a new node; `strata token api|list|revoke`:
operator tokens, read-only or admin, issued, listed and revoked."""

from __future__ import annotations

import time
from enum import StrEnum
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
    shown,
)
from strata.control_client import ControlClient
from strata.core.errors import ConfigError, NotFound

app = typer.Typer(
    help="Enrollment tokens for new nodes; operator API tokens (issue, list, revoke).", no_args_is_help=True
)


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
    name: Annotated[
        str | None, typer.Option("--name", help="What it is for (grafana, ci): shown by `strata token list`.")
    ] = None,
) -> None:
    """Print a new operator API token, alone on the last line (for STRATA_TOKEN or --token)."""
    with ControlClient(server, token) as client:
        issued = client.create_api_token(scope.value, name)
    named = f" {shown(issued['name'])}" if issued.get("name") else ""
    console.print(f"{issued['scope']} API token{named} (id {issued['id']}; strata token revoke {issued['id']}):")
    typer.echo(issued["token"])


def tokens_table(tokens: list[dict[str, Any]], now: float) -> Table:
    """Operator tokens as a Rich table: one row a token, oldest first."""
    table = Table(title="operator API tokens", title_justify="left")
    for column in ("id", "name", "scope", "created", "last used"):
        table.add_column(column)
    for item in tokens:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(item["created_at"]))
        table.add_row(
            shown(item["id"]),
            shown(item["name"]) if item.get("name") else "-",
            shown(item["scope"]),
            f"{created} ({ago(item['created_at'], now)})",
            ago(item.get("last_used_at"), now),
        )
    return table


@app.command("list")
def list_tokens(server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Operator API tokens not revoked: id, name, scope, when made and last used (never a secret)."""
    with ControlClient(server, token) as client:
        tokens = client.api_tokens()
    if as_json:
        print_json(tokens)
        return
    out.print(tokens_table(tokens, time.time()))


@app.command("revoke")
def revoke(
    name_or_id: Annotated[str, typer.Argument(help="The token's id, or its name if no other token has it.")],
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Revoke an operator API token: every replica refuses it within seconds. The last admin token is kept."""
    with ControlClient(server, token) as client:
        found = _resolve(client.api_tokens(), name_or_id)
        client.revoke_api_token(found["id"])
    named = f" {shown(found['name'])}" if found.get("name") else ""
    console.print(f"revoked {found['scope']} API token{named} ({found['id']})")


def _resolve(tokens: list[dict[str, Any]], which: str) -> dict[str, Any]:
    """The token `which` names: its id, else the one token with that name.

    Raises:
        NotFound: no token has that id or name (a revoked token is not listed).
        ConfigError: several tokens have that name.
    """
    by_id = [t for t in tokens if t["id"] == which]
    matches = by_id or [t for t in tokens if t.get("name") == which]
    if not matches:
        raise NotFound(f"there is no operator token {which!r} (a revoked token is not listed: strata token list)")
    if len(matches) > 1:
        ids = ", ".join(t["id"] for t in matches)
        raise ConfigError(f"{len(matches)} tokens are named {which!r} ({ids}): revoke one by its id")
    return matches[0]
