"""`strata telemetry`'s table at a fixed terminal width: every cell whole, columns left out instead, the key figures
kept."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from strata.cli.telemetry import telemetry_table


def node(
    name: str, requests: int, rates: tuple[float, float, float], p95: float | None, **extra: Any
) -> dict[str, Any]:
    error_rate, client_error_rate, shed_rate = rates
    return {
        "node": name, "node_id": f"id-{name}", "model": "digits", "version": "2", "requests": requests,
        "errors": 0, "client_errors": 0, "shed": 0, "error_rate": error_rate, "client_error_rate": client_error_rate,
        "shed_rate": shed_rate, "n": requests, "p50_ms": 0.41, "p95_ms": p95, "p99_ms": None, "drift": [],
        "dropped": {"events_sampled": 3}, **extra,
    }  # fmt: skip


DRIFTING = [{"tensor": "X", "psi": 0.512, "chi_square": 80.1, "p_value": 1.2e-30, "samples": 900,
             "drifting": True}]  # fmt: skip
ANSWER = {
    "minutes": [],
    "nodes": [
        node("edge-12", 12840, (0.0312, 0.0021, 0.1250), 0.93, drift=DRIFTING),
        node("edge-2", 15, (0.0, 0.0, 0.0), None),
    ],
}


def shown(width: int, answer: dict[str, Any] = ANSWER) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(telemetry_table(answer, "digits over the last 1h", width))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 200])
def test_every_cell_is_whole_and_the_key_figures_are_there(width: int) -> None:
    """At 80 columns the eleven columns were folded mid-word ("edge-1 2", "0.2 1%", "too f ew")."""
    lines = shown(width)
    assert all(len(line) <= width for line in lines)
    rows = [line for line in lines if line.startswith("│") and line.split("│")[1].strip()]
    first_cells = [row.split("│")[1].strip() for row in rows]
    assert first_cells == ["edge-12", "edge-2"]
    busy = next(row for row in rows if "edge-12" in row)
    # requests, the error rate, the client error and shed rates and p95 whole on the node's first line
    for figure in ("12840", "3.12%", "0.21%", "12.50%", "0.93"):
        assert f" {figure} " in busy, (figure, busy)
    text = "\n".join(lines)
    assert "too few" in " ".join(text.split())  # edge-2's p95 rests on 15 requests
    for word in ("psi=0.512", "p=1.2e-30", "DRIFT"):  # the drift cell wraps between words only
        assert word in text


def test_a_narrow_terminal_says_what_it_left_out_and_a_wide_one_shows_everything() -> None:
    wide = "\n".join(shown(200))
    assert "left out" not in wide
    assert all(shown_too in wide for shown_too in ("p99", "dropped", "0.41")), wide
    narrow = " ".join(" ".join(shown(80)).split())
    assert "left out for the terminal's width: n, p50 ms, p99 ms, dropped" in narrow
    assert "0.41" not in narrow  # p50 is one of them
    # longer names and a longer tensor name: more left out, the error rate stays whatever the width
    named = {"minutes": [], "nodes": [{**ANSWER["nodes"][0], "node": "edge-berlin-01", "drift": [
        {**DRIFTING[0], "tensor": "float_input"}]}]}  # fmt: skip
    assert "left out for the terminal's width: n, p50 ms, p99 ms, dropped, client errors" in " ".join(
        " ".join(shown(80, named)).split()
    )
    very_narrow = " ".join(" ".join(shown(50, named)).split())
    assert "left out for the terminal's width: n, p50 ms, p99 ms, dropped, client errors, shed, requests" in (
        very_narrow
    )
    assert all(kept in very_narrow for kept in ("edge-berlin-01", "3.12%")), very_narrow


def test_an_older_servers_answer_shows_no_shed_rate() -> None:
    old = {"minutes": [], "nodes": [{k: v for k, v in ANSWER["nodes"][1].items() if k not in ("shed", "shed_rate")}]}
    [row] = [line for line in shown(200, old) if "edge-2" in line]
    assert [cell.strip() for cell in row.split("│")[1:7]] == ["edge-2", "2", "15", "0.00%", "0.00%", "-"]
