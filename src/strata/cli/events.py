"""`strata events [--since 1h] [--kind K ...] [--node N] [--follow]`: what happened in the fleet, oldest first."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from strata.cli.common import JsonOption, ServerOption, TokenOption, out, parse_duration, print_json, shown
from strata.control_client import ControlClient

_STYLE = {"failed": "red", "revoked": "red", "rolled_back": "yellow", "gate": "cyan", "rollout": "cyan"}


def _line(event: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"]))
    style = _STYLE.get(event["kind"], "green")
    who = f"{event['node']}: " if event.get("node") else ""
    return f"{when} [{style}]{event['kind']:<11}[/{style}] {shown(who)}{shown(event['message'])}"


def events(
    since: Annotated[str, typer.Option("--since", help="How far back to start (90s, 10m, 2h, 7d).")] = "1h",
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            help="Only this kind (repeatable): enrolled, revoked, activated, rolled_back, removed, failed, deployed, "
            "undeployed, rollout, gate.",
        ),
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only events about this node (name or id).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events as they happen.")] = False,
    interval: Annotated[str, typer.Option("--interval", help="How often --follow asks for new events.")] = "2s",
    limit: Annotated[int, typer.Option("--limit", help="At most this many of the latest events to start with.")] = 200,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """The fleet's events, oldest first: enrollments, activations, rollbacks, removals, failures with their reasons,
    deployments, rollouts and their gates' results, revocations. --json prints a list, or with --follow one JSON
    object per line."""
    start = time.time() - parse_duration(since)
    pause = parse_duration(interval)
    kinds = list(kind or [])
    with ControlClient(server, token) as client:
        batch = client.events(since=start, kinds=kinds, node=node, limit=limit)
        if as_json and not follow:
            print_json(batch)
            return
        # Following: ask for what came after the newest event seen (of any kind, when none matched yet).
        newest = batch or (client.events(limit=1) if follow else [])
        cursor = int(newest[-1]["id"]) if newest else 0
        try:
            while True:
                for event in batch:
                    if as_json:
                        sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
                    else:
                        out.print(_line(event))
                if not follow:
                    return
                sys.stdout.flush()
                time.sleep(pause)
                batch = client.events(after=cursor, kinds=kinds, node=node, limit=1000)
                cursor = int(batch[-1]["id"]) if batch else cursor
        except KeyboardInterrupt:  # the way to stop --follow
            return
