"""`strata telemetry NAME`: requests, error rates, latency percentiles and drift of a model across the fleet."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from strata.cli.common import JsonOption, ServerOption, TokenOption, out, parse_duration, print_json, shown
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
    text = f"{shown(worst['tensor'])} psi={worst['psi']:.3f}" + (f" p={p_value:.2g}" if p_value is not None else "")
    return f"[red]{text} DRIFT[/red]" if worst["drifting"] else text


def telemetry(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str | None, typer.Option("--version", help="Only this version.")] = None,
    node: Annotated[str | None, typer.Option("--node", help="Only this node (by name).")] = None,
    since: Annotated[str, typer.Option("--since", help="How far back (30m, 1h, 7d).")] = "1h",
    per_node: Annotated[
        bool,
        typer.Option(
            "--per-node",
            help="With --json: one object per node and version, the table's rows, instead of one per minute.",
        ),
    ] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per node: requests; error rate (of the requests the node took on, those the model or the node failed: the
    rollout gates' error rate); beside it, as shares of all requests, client errors (refused as the caller's fault:
    malformed, or not fitting the model's signature) and shed (turned away by admission control, the node busy);
    p50/p95/p99 latency, drift and dropped telemetry. Percentiles say how many requests they rest on (n) and are
    shown only above a minimum: p50 2, p95 20, p99 100 ("too few" below). A narrow terminal leaves out n, p50, p99,
    dropped, then more, and says which. With --json: one object per node and minute (node, minute, requests,
    errors (every failure), client_errors and shed (the parts of them that were the caller's fault and that were
    shed), n, percentiles, null below the minimum). With --json --per-node: one object per node and version, what
    the table shows (the same counts, error_rate, client_error_rate and shed_rate, n and percentiles over the whole
    window, every tensor's drift, dropped telemetry by kind)."""
    if per_node and not as_json:
        raise typer.BadParameter(
            "only with --json: the table already has a row per node and version", param_hint="--per-node"
        )
    with ControlClient(server, token) as client:
        answer = client.telemetry(name, version, node, parse_duration(since))
    if as_json:
        # The minutes stay the plain list that --json has always printed; the per-node rows are asked for.
        print_json(answer["nodes"] if per_node else answer["minutes"])
        return
    if not answer["nodes"]:  # an empty table with its headers said nothing about why
        scope = "".join(f" {what} {shown(value)}" for what, value in (("version", version), ("on node", node)) if value)
        out.print(f"no telemetry for {shown(name)}{scope} over the last {since}")
        return
    out.print(telemetry_table(answer, f"{name} over the last {since}", out.width))


def _percent(row: dict[str, Any], key: str) -> str:
    """A rate as a percentage; `-` where an older server's answer lacks it."""
    value = row.get(key)
    return "-" if value is None else f"{100 * value:.2f}%"


# The columns a narrow terminal leaves out, least needed first (--json has the counts and percentiles per minute);
# node, version and the error rate always stay. The drift and percentile columns wrap between words ("too few");
# every other cell keeps to one line, so no number or name is ever cut in two.
_LEAVE_OUT = ("n", "p50 ms", "p99 ms", "dropped", "client errors", "shed", "requests", "drift", "p95 ms")
_WRAPPING = frozenset({"drift", "p50 ms", "p95 ms", "p99 ms"})


def telemetry_table(answer: dict[str, Any], title: str, width: int | None = None) -> Table:
    """Per node and version: traffic, error rates (the model's or node's failures of the requests taken on; the
    caller's faults and the shed requests apart, over all requests), latency percentiles, drift and dropped
    telemetry. With `width` (the terminal's), the columns that do not fit are left out, least needed first, and
    the caption names them."""
    rows = answer["nodes"]
    dropped = [sum(v for k, v in row["dropped"].items() if k != "minute_requests") for row in rows]
    # (key, header, cells); a header may take two lines, so that it is no wider than its numbers need
    columns: list[tuple[str, str, list[str]]] = [
        ("node", "node", [row["node"] for row in rows]),
        ("version", "version", [row["version"] for row in rows]),
        ("requests", "requests", [str(row["requests"]) for row in rows]),
        ("error rate", "error\nrate", [_percent(row, "error_rate") for row in rows]),
        ("client errors", "client\nerrors", [_percent(row, "client_error_rate") for row in rows]),
        ("shed", "shed", [_percent(row, "shed_rate") for row in rows]),  # absent from an older server's answer
        ("n", "n", [str(row["n"]) for row in rows]),
        *((f"{p} ms", f"{p}\nms", [_ms(row[f"{p}_ms"], row["n"]) for row in rows]) for p in ("p50", "p95", "p99")),
        ("drift", "drift", [drift_text(row) for row in rows]),
        ("dropped", "dropped", [str(count) if count else "-" for count in dropped]),
    ]
    left_out: list[str] = []
    if width is not None:
        for key in _LEAVE_OUT:
            if _needed_width(columns) <= width:
                break
            columns = [column for column in columns if column[0] != key]
            left_out.append(key)
    caption = f"left out for the terminal's width: {', '.join(left_out)}" if left_out else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for key, header, _ in columns:
        table.add_column(header, no_wrap=key not in _WRAPPING, overflow="fold")
    for cells in zip(*(cells for _, _, cells in columns), strict=True):
        table.add_row(*cells)
    return table


def _needed_width(columns: list[tuple[str, str, list[str]]]) -> int:
    """The table's width with every one-line cell whole and the wrapping columns wrapped at their longest word."""
    width = 1  # the left border; each column adds its padding (2) and a border (1)
    for key, header, cells in columns:
        texts = [Text.from_markup(cell) for cell in cells] + [Text(line) for line in header.split("\n")]
        if key in _WRAPPING:
            texts = [Text(word) for text in texts for word in text.plain.split()]
        width += max(text.cell_len for text in texts) + 3
    return width
