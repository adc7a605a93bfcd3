"""`strata rollout create|watch|status|list|pause|resume|abort`: a version to the fleet wave by wave, with gates."""

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
    print_json,
    shown,
)
from strata.cli.progress import (
    EXIT_FAILED,
    EXIT_TIMEOUT,
    AllOption,
    SelectorOption,
    TimeoutOption,
    target_selector,
    watch,
)
from strata.control_client import ControlClient
from strata.core.words import plural

# A rollout in one of these has ended (strata.control.rollout_plan.FINISHED; the CLI does not import the server).
FINISHED = ("succeeded", "rolled_back", "aborted")

app = typer.Typer(help="Staged rollouts with health gates and automatic rollback.", no_args_is_help=True)


def _words(state: str) -> str:
    return state.replace("_", " ")  # rolled_back: a node's state, as the API names it


# The live view names at most this many nodes that refused the version (`strata rollout status` names them all).
LIVE_REFUSED = 5


def _refused(rollout: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes kept out because they refused the version themselves (they stay out of this rollout for good);
    none from a server older than the field."""
    return [item for item in rollout.get("excluded", []) if item.get("refused")]


def _summary(rollout: dict[str, Any]) -> str:
    refused = len(_refused(rollout))

    def count(state: str, n: int) -> str:
        said = f"{n} {_words(state)}"
        return f"{said} ({refused} refused the version)" if state == "excluded" and refused else said

    counts = ", ".join(count(state, n) for state, n in sorted(rollout.get("counts", {}).items())) or "no nodes"
    return (
        f"rollout {shown(rollout['id'])}: {shown(rollout['model'])} {shown(rollout['version'])} —"
        f" {shown(rollout['status'])}, "
        f"wave {rollout['wave']}/{rollout['waves']} ({counts})"
    )


def _refused_lines(rollout: dict[str, Any], limit: int | None = None) -> list[str]:
    """Which nodes refused the version and why, `limit` of them at most; no lines when none did."""
    refused = _refused(rollout)
    if not refused:
        return []
    lines = [f"  {plural(len(refused), 'node')} refused the version (out of this rollout for good):"]
    listed = refused if limit is None else refused[:limit]
    # The reason quotes what the node reported: text, never markup.
    lines.extend(f"    {shown(item['node'])}: {shown(item['reason'])}" for item in listed)
    if len(listed) < len(refused):
        lines.append(f"    … and {len(refused) - len(listed)} more (strata rollout status {shown(rollout['id'])})")
    return lines


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version to roll out.")],
    selector: SelectorOption = "",
    every_node: AllOption = False,
    waves: Annotated[
        str, typer.Option("--waves", help="Cumulative wave sizes: percentages or counts (a last 100% is implied).")
    ] = "1%,10%,50%,100%",
    max_unavailable: Annotated[
        int | None, typer.Option("--max-unavailable", help="At most this many online nodes update at once.")
    ] = None,
    bake: Annotated[str, typer.Option("--bake", help="How long nodes must stay healthy before a wave passes.")] = "10m",
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            help="METRIC OP NUMBER, replacing the default on that metric (repeatable); may end with "
            "' on-no-data=hold|pass|fail' (this gate's own no-data policy). Metrics: activation_success_rate "
            "(default >=0.95), error_rate_delta (<=0.01), p95_latency_ratio (<=1.5), drift_psi (<=0.25), "
            "error_rate.",
        ),
    ] = None,
    on_failure: Annotated[
        str, typer.Option("--on-failure", help="rollback (every node returns to what it had) or pause.")
    ] = "rollback",
    wave_deadline: Annotated[
        str, typer.Option("--wave-deadline", help="Offline nodes stop holding a wave this long after it starts.")
    ] = "1h",
    min_requests: Annotated[
        int, typer.Option("--min-requests", help="Requests a node needs before its errors and latency count.")
    ] = 20,
    min_drift_requests: Annotated[
        int,
        typer.Option("--min-drift-requests", help="Requests a canary node needs in the wave before its drift counts."),
    ] = 100,
    on_no_data: Annotated[
        str,
        typer.Option(
            "--on-no-data",
            help="A gate without enough data: hold (wait until the wave deadline, then fail), pass (saying it "
            "was not judged) or fail.",
        ),
    ] = "hold",
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="Stay and show it live until it succeeds (exit 0), or is rolled back, aborted or halted (exit 1).",
        ),
    ] = False,
    timeout: TimeoutOption = "2h",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start rolling NAME VERSION out to the nodes the selector matches; prints the rollout id on its last line."""
    body = {
        "model": name,
        "version": version,
        "selector": target_selector(selector, every_node),
        "waves": waves,
        "max_unavailable": max_unavailable,
        "bake_seconds": parse_duration(bake),
        "gates": list(gate or []),
        "on_failure": on_failure,
        "wave_deadline_seconds": parse_duration(wave_deadline),
        "min_requests": min_requests,
        "min_drift_requests": min_drift_requests,
        "on_no_data": on_no_data,
    }
    with ControlClient(server, token) as client:
        created = client.create_rollout(body)
        if as_json:
            print_json(created)
        else:
            console.print(_summary(created))
        typer.echo(created["id"])
        if wait:
            _watch(client, str(created["id"]), timeout)


def _live_view(rollout: dict[str, Any]) -> Group:
    parts: list[RenderableType] = [
        _summary(rollout),
        f"  {shown(rollout['message'])}",
        *_refused_lines(rollout, LIVE_REFUSED),
        _waves_table(rollout),
    ]
    if rollout.get("gate_results") or rollout.get("failed_gate"):
        parts.append(_gate_table(rollout.get("gate_results", []), rollout.get("failed_gate")))
    return Group(*parts)


def _watch(client: ControlClient, rollout_id: str, timeout: str) -> None:
    """Show the rollout live until it ends or halts; exit with the code `strata.cli.progress` documents.

    Raises:
        typer.Exit: it did not succeed (1), or the timeout passed first (124).
    """

    def halted(rollout: dict[str, Any]) -> bool:
        return rollout["status"] in FINISHED or (rollout["status"] == "paused" and bool(rollout.get("failed_gate")))

    final, finished = watch(lambda: client.rollout(rollout_id), _live_view, halted, timeout)
    if not finished:
        console.print(f"[red]timed out[/red] after {timeout}: rollout {rollout_id} is {final['status']}")
        raise typer.Exit(EXIT_TIMEOUT)
    if final["status"] != "succeeded":
        console.print(f"[red]rollout {rollout_id} {_words(final['status'])}:[/red] {shown(final['message'])}")
        raise typer.Exit(EXIT_FAILED)
    console.print(f"[green]rollout {rollout_id} succeeded[/green]")


@app.command("watch")
def watch_rollout(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    timeout: TimeoutOption = "2h",
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Follow a rollout live (waves, nodes, gates) until it succeeds (exit 0) or is rolled back, aborted or halted by
    a gate (exit 1); 124 when --timeout passes first."""
    with ControlClient(server, token) as client:
        _watch(client, rollout_id, timeout)


_VERDICTS = {
    "pass": "[green]pass[/green]",
    "fail": "[red]FAIL[/red]",
    "not_applicable": "n/a",
    "no_data": "[yellow]waiting for data[/yellow]",
    "pass_no_data": "[yellow]pass, NOT JUDGED[/yellow]",
    "fail_no_data": "[red]FAIL (no data)[/red]",
}


def _gate_table(results: list[dict[str, Any]], failed: dict[str, Any] | None) -> Table:
    table = Table(title="gates (last evaluation)", title_justify="left")
    for column in ("wave", "gate", "value", "result", "numbers"):
        table.add_column(column)
    rows = list(results)
    if failed is not None and failed not in rows:
        rows.append(failed)
    for result in rows:
        value = result.get("value")
        table.add_row(
            str(result["wave"] + 1),
            shown(result["gate"]),
            "-" if value is None else f"{value:.4g}",
            _VERDICTS.get(result.get("verdict", ""), "[green]pass[/green]" if result["passed"] else "[red]FAIL[/red]"),
            shown(result.get("detail", "")),
        )
    return table


def _waves_table(rollout: dict[str, Any]) -> Table:
    waves = Table(title="waves", title_justify="left")
    detail = rollout.get("waves_detail", [])
    # nodes, then the states the rollout's nodes can be in (what they ended as, once it has finished)
    counted = [k for k in detail[0] if k not in ("wave", "target")] if detail else ["nodes"]
    for column in ("wave", "target", *counted):
        waves.add_column(_words(column))
    for wave in detail:
        marker = " ←" if wave["wave"] == rollout["wave"] and rollout["status"] in ("running", "paused") else ""
        waves.add_row(f"{wave['wave']}{marker}", shown(wave["target"]), *(str(wave.get(k, 0)) for k in counted))
    return waves


@app.command("status")
def status(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Where a rollout stands: waves, nodes, the gates' numbers, which gate failed, and which nodes are kept out."""
    with ControlClient(server, token) as client:
        rollout = client.rollout(rollout_id)
    if as_json:
        print_json(rollout)
        return
    out.print(rollout_detail(rollout, time.time()))


def rollout_detail(rollout: dict[str, Any], now: float) -> Group:
    """What `strata rollout status` prints: the summary, the message, the failed gate, the waves and gates, every
    node, and the nodes kept out (those that refused the version marked: they stay out for good)."""
    # Messages, notes and reasons quote what nodes reported (a failure's reason): text, never markup.
    parts: list[RenderableType] = [_summary(rollout), f"  {shown(rollout['message'])}"]
    failed = rollout.get("failed_gate")
    if failed:
        parts.append(
            f"  [red]failed gate:[/red] {shown(failed['gate'])} in wave {failed['wave'] + 1}: "
            f"value {shown(failed['value'])}, {shown(failed['detail'])}"
        )
    parts.append(_waves_table(rollout))
    if rollout.get("gate_results") or failed:
        parts.append(_gate_table(rollout.get("gate_results", []), failed))
    nodes = Table(title="nodes", title_justify="left")
    for column in ("node", "wave", "state", "had", "runs", "online", "note"):
        nodes.add_column(column)
    for node in rollout.get("nodes", []):
        nodes.add_row(
            shown(node["name"]),
            "-" if node["wave"] is None else str(node["wave"]),
            shown(_words(node["state"])) + (" (refused)" if node.get("refused") else ""),
            shown(node["previous_version"] or "-"),  # what the node reported
            shown(node["current_version"] or "-"),
            "yes" if node["online"] else "no",
            shown(node["excluded"] or node["failure"] or ""),
        )
    parts.append(nodes)
    excluded = rollout.get("excluded", [])
    if excluded:
        refused = len(_refused(rollout))
        why = f" ({refused} refused the version: out of this rollout for good)" if refused else ""
        parts.append(f"{plural(len(excluded), 'node')} kept out{why}:")
        for item in excluded:
            marker = " (refused)" if item.get("refused") else ""
            parts.append(f"  {shown(item['node'])}{marker}: {shown(item['reason'])}")
    parts.append(f"created {ago(rollout['created_at'], now)}")
    return Group(*parts)


@app.command("list")
def list_rollouts(server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Every rollout, newest first."""
    with ControlClient(server, token) as client:
        rollouts = client.rollouts()
    if as_json:
        print_json(rollouts)
        return
    out.print(rollouts_table(rollouts))


def rollouts_table(rollouts: list[dict[str, Any]]) -> Table:
    """What `strata rollout list` prints: one row per rollout; its nodes say how many refused the version."""
    table = Table(title="rollouts", title_justify="left")
    for column in ("id", "model", "version", "status", "wave", "nodes", "message"):
        table.add_column(column)
    for rollout in rollouts:
        refused = len(_refused(rollout))
        table.add_row(
            shown(rollout["id"]),
            shown(rollout["model"]),
            shown(rollout["version"]),
            shown(rollout["status"]),
            f"{rollout['wave']}/{rollout['waves']}",
            str(sum(rollout.get("counts", {}).values())) + (f" ({refused} refused)" if refused else ""),
            shown(rollout["message"]),
        )
    return table


def _act(action: str, rollout_id: str, server: str | None, token: str | None, as_json: bool) -> None:
    with ControlClient(server, token) as client:
        rollout = client.rollout_action(rollout_id, action)
    if as_json:
        print_json(rollout)
    else:
        console.print(_summary(rollout))


@app.command("pause")
def pause(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop starting waves; nodes keep what they run."""
    _act("pause", rollout_id, server, token, as_json)


@app.command("resume")
def resume(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Carry on a paused rollout."""
    _act("resume", rollout_id, server, token, as_json)


@app.command("abort")
def abort(
    rollout_id: Annotated[str, typer.Argument(help="Rollout id.")],
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """End the rollout; every node of it returns to the version it had."""
    _act("abort", rollout_id, server, token, as_json)
