"""`strata telemetry NAME`: requests, error rates, latency percentiles and drift of a model across the fleet."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from strata.cli.common import JsonOption, ServerOption, TokenOption, out, parse_duration, print_json
from strata.control_client import ControlClient


def _ms(value: float | None, n: int) -> str:
    """A percentile, `-` without traffic, `too few` where the server holds it back (fewer requests than it needs)."""
    if value is not None:
        return f"{value:.2f}"
    return "too few" if n else "-"


def drift_text(node: dict[str, Any]) -> str:
    """The worst tensor's PSI and chi-square p-value, flagged when it drifts."""
    drift = node.get("drift") or []
    if not drift:
        return "-"
    worst = max(drift, key=lambda d: d["psi"])
    p_value = worst["p_value"]
    shown = f"{worst['tensor']} psi={worst['psi']:.3f}" + (f" p={p_value:.2g}" if p_value is not None else "")
    return f"[red]{shown} DRIFT[/red]" if worst["drifting"] else shown


def telemetry(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str | None, typer.Option("--version", help="Only this version.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node (by name).")] = None,
    since: Annotated[str, typer.Option("--since", help="How far back (30m, 1h, 7d).")] = "1h",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per node: requests, error rate (what the model or node failed), client error rate (requests refused as the
    caller's fault: malformed, or not fitting the model's signature), p50/p95/p99 latency and drift. Percentiles
    say how many requests they rest on (n) and are shown only above a minimum: p50 2, p95 20, p99 100 ("too few"
    below). With --json: one object per node and minute (node, minute, requests, errors (every failure),
    client_errors (the caller's part of them), n, percentiles, null below the minimum)."""
    with ControlClient(server, token) as client:
        answer = client.telemetry(name, version, node, parse_duration(since))
    if as_json:
        print_json(answer["minutes"])
        return
    out.print(telemetry_table(answer, f"{name} over the last {since}"))


def telemetry_table(answer: dict[str, Any], title: str) -> Table:
    """Per node and version: traffic, error rates (the model's or node's failures, and the caller's apart),
    latency percentiles, drift and dropped telemetry."""
    table = Table(title=title, title_justify="left")
    columns = ("node", "version", "requests", "error rate", "client error rate", "n", "p50 ms", "p95 ms", "p99 ms")
    for column in (*columns, "drift", "dropped"):
        table.add_column(column)
    for row in answer["nodes"]:
        dropped = sum(v for k, v in row["dropped"].items() if k != "minute_requests")
        table.add_row(
            row["node"],
            row["version"],
            str(row["requests"]),
            f"{100 * row['error_rate']:.2f}%",
            f"{100 * row.get('client_error_rate', 0.0):.2f}%",  # absent from an older server's answer
            str(row["n"]),
            _ms(row["p50_ms"], row["n"]),
            _ms(row["p95_ms"], row["n"]),
            _ms(row["p99_ms"], row["n"]),
            drift_text(row),
            str(dropped) if dropped else "-",
        )
    return table
