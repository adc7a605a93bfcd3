"""`strata rollout watch`/`status` print a rollout's messages and gate details as text: they quote what nodes
reported (a failure's reason is any string). `watch`, `status` and `list` tell the nodes that refused the version
themselves (out for good) from those kept out otherwise."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console, RenderableType

from strata.cli.rollout import LIVE_REFUSED, _live_view, _summary, rollout_detail, rollouts_table

SLY = "probation: load failed [/] [link=https://evil.example]x[/link]"


def test_a_rollouts_message_and_gate_details_are_text_not_markup() -> None:
    # '[/]' in a message made the live view fail with Rich's MarkupError; '[link=...]' would have styled it
    gate = {"wave": 0, "gate": "error_rate < 0.05", "value": 0.5, "passed": False, "verdict": "fail", "detail": SLY}
    rollout: dict[str, Any] = {
        "id": "r1", "model": "digits", "version": "2", "status": "rolled_back", "wave": 1, "waves": 2,
        "counts": {"rolled_back": 1}, "message": f"gate failed: {SLY}",
        "waves_detail": [{"wave": 1, "target": "1", "nodes": 1, "rolled_back": 1, "unchanged": 0, "failed": 0}],
        "gate_results": [gate], "failed_gate": gate,
    }  # fmt: skip
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(_live_view(rollout))
    text = console.export_text()
    assert f"gate failed: {SLY}" in text
    assert text.count(SLY) == 2


def shown(renderable: RenderableType) -> str:
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def refusing_rollout(refusing: int) -> dict[str, Any]:
    """A running rollout with one node kept out by a pin and `refusing` that refused the version themselves."""
    excluded = [{"node": "held", "reason": "pinned to 1 (pin 3)", "refused": False}]
    excluded += [
        {"node": f"n{i}", "reason": f"the node refused it: refused by placement policy {SLY}", "refused": True}
        for i in range(refusing)
    ]
    nodes = [
        {"name": item["node"], "wave": None, "state": "excluded", "previous_version": "1", "current_version": "1",
         "online": True, "excluded": item["reason"], "failure": None, "refused": item["refused"]}
        for item in excluded
    ]  # fmt: skip
    return {
        "id": "7", "model": "digits", "version": "2", "status": "running", "wave": 1, "waves": 1,
        "counts": {"excluded": len(excluded), "healthy": 1}, "message": "wave 1: gate waits for data",
        "waves_detail": [{"wave": 1, "target": "100%", "nodes": 1, "healthy": 1, "updating": 0, "pending": 0,
                          "failed": 0}],
        "gate_results": [], "failed_gate": None, "excluded": excluded, "nodes": nodes, "created_at": 0.0,
    }  # fmt: skip


def test_nodes_that_refused_the_version_are_told_apart_from_nodes_kept_out() -> None:
    """A node that refused the version stays out of the rollout for good: the summary (watch, status, pause ...),
    the live view, status and list said only "excluded", as for a pin that lets the node back in once lifted."""
    rollout = refusing_rollout(2)
    assert "(3 excluded (2 refused the version), 1 healthy)" in _summary(rollout)

    live = shown(_live_view(rollout))
    assert "2 nodes refused the version (out of this rollout for good):" in live
    assert f"n0: the node refused it: refused by placement policy {SLY}" in live  # text, not markup
    assert "held" not in live  # the live view names only the nodes that refused

    detail = shown(rollout_detail(rollout, 60.0))
    assert "3 nodes kept out (2 refused the version: out of this rollout for good):" in detail
    assert "  held: pinned to 1 (pin 3)" in detail
    assert f"  n1 (refused): the node refused it: refused by placement policy {SLY}" in detail
    rows = {line.split("│")[1].strip(): line for line in detail.splitlines() if line.startswith("│")}
    assert "excluded (refused)" in rows["n0"]
    assert "excluded (refused)" not in rows["held"]

    listed = next(line for line in shown(rollouts_table([rollout])).splitlines() if line.startswith("│ 7 "))
    assert " 4 (2 refused) " in listed


def test_the_live_view_names_a_few_refusing_nodes_and_an_older_servers_answer_shows_none() -> None:
    live = shown(_live_view(refusing_rollout(LIVE_REFUSED + 3)))
    assert f"{LIVE_REFUSED + 3} nodes refused the version" in live
    assert f"n{LIVE_REFUSED - 1}: " in live
    assert f"n{LIVE_REFUSED}: " not in live
    assert "… and 3 more (strata rollout status 7)" in live
    # A server older than the field: no "refused" key; the nodes are kept out as before, none said to refuse.
    older = refusing_rollout(1)
    for item in (*older["excluded"], *older["nodes"]):
        del item["refused"]
    assert "refused the version" not in _summary(older)
    assert "refused the version" not in shown(_live_view(older))
    assert "(refused)" not in shown(rollout_detail(older, 60.0))
    assert "refused)" not in shown(rollouts_table([older]))


def test_the_versions_a_node_reports_are_shown_as_text_never_read_as_markup() -> None:
    # A rollout's nodes table quotes the versions each node reported it had and runs: '[/yellow]' made
    # `strata rollout status` fail with Rich's MarkupError.
    rollout = refusing_rollout(0)
    rollout["nodes"][0].update(previous_version="[/yellow]", current_version="1[link=https://evil.example]x[/link]")
    text = shown(rollout_detail(rollout, 0.0))
    assert "[/yellow]" in text
    assert "1[link=https://evil.example]x[/link]" in text
