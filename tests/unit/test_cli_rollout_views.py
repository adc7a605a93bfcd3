"""`strata rollout watch`/`status` print a rollout's messages and gate details as text: they quote what nodes
reported (a failure's reason is any string)."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from strata.cli.rollout import _live_view

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
