"""How `strata nodes list` and `strata nodes show` print what a node claims apart from what the operator assigned."""

from __future__ import annotations

import io
import re
from typing import Any

from rich.console import Console, RenderableType

from strata.cli.nodes import fleet_table, node_detail

NODE: dict[str, Any] = {
    "id": "n-1",
    "name": "edge-1",
    "tier": "device",
    "labels": {"ring": "canary", "site": "lab"},
    "profile": "cpu-generic",
    "online": True,
    "last_seen": 100.0,
}


def shown(renderable: RenderableType) -> str:
    console = Console(width=240, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_claimed_labels_show_as_k_v_and_a_claimed_tier_is_marked_on_the_tier() -> None:
    # The report's labels match the assigned ones; only its tier differs (what the control plane's claims hold).
    tier_only = {**NODE, "claims": {"tier": "near-edge"}}
    row = next(line for line in shown(fleet_table([tier_only], 100.0)).splitlines() if "edge-1" in line)
    assert "ring=canary,site=lab " in row  # the labels are not said to be unused: they are the assigned ones
    assert "device (claims near-edge; not used)" in row
    assert row.count("not used") == 1

    both = {**NODE, "claims": {"tier": "near-edge", "labels": {"site": "home"}, "profile": "x86_64-avx2"}}
    row = next(line for line in shown(fleet_table([both], 100.0)).splitlines() if "edge-1" in line)
    assert "ring=canary,site=lab (claims site=home; not used)" in row
    detail = shown(node_detail(both, 100.0))
    assert "labels site=home; profile x86_64-avx2; tier near-edge" in detail
    assert re.search(r"labels \(assigned\) +ring=canary, site=lab", detail)  # a line has room: ", " between them
    assert "{" not in detail  # no Python dict
    cleared = shown(node_detail({**NODE, "claims": {"labels": {}}}, 100.0))
    assert "labels none" in cleared


def test_what_a_node_reports_is_shown_as_text_never_read_as_markup() -> None:
    # A node claims the labels, tier and profile it likes, and reports its serving URL and agent version: claimed
    # '[/yellow]' made `strata nodes list` fail with Rich's MarkupError, and '[link=...]' would have styled the cell.
    sly = "[/yellow][link=https://evil.example]x[/link]"
    node = {
        **NODE,
        "labels": {"site": "[bold]lab"},
        "claims": {"tier": sly, "labels": {"site": sly}, "profile": sly},
        "serve_url": sly,
        "agent_version": "[/red]",
        "models": {"digits": "[/cyan]"},
    }
    table = shown(fleet_table([node], 100.0))
    assert table.count(sly) == 3  # tier, labels and profile claims, as sent
    assert "site=[bold]lab" in table
    assert "digits=[/cyan]" in table
    detail = shown(node_detail(node, 100.0))
    assert sly in detail
    assert "[/red]" in detail


def test_the_cli_console_writes_out_hidden_characters_and_keeps_its_own_markup() -> None:
    # Every string the CLI prints goes through its consoles' render_str, table cells and plain prints alike, so a
    # place that forgets `shown` still cannot hand a terminal an escape sequence.
    from rich.table import Table

    from strata.cli.common import TerminalConsole

    screen = io.StringIO()
    console = TerminalConsole(file=screen, force_terminal=True, color_system="standard", width=120)
    table = Table()
    table.add_column("version")
    table.add_row("1.0\x1b]0;owned\x07")
    console.print(table)
    console.print("[red]failed:[/red] ok\rFAILED :smile: \u202edone\nsecond line\tend")
    text = screen.getvalue()
    for hidden in ("\x1b]0;owned", "\x07", "\r", "\u202e"):
        assert hidden not in text
    assert "1.0\\x1b]0;owned\\x07" in text
    assert "ok\\rFAILED :smile: \\u202edone\nsecond line" in text  # newlines and tabs stay; no emoji for codes
    assert "\x1b[31mfailed:\x1b[0m" in text  # the CLI's own markup still styles


def test_the_slots_a_node_reports_are_shown_as_text_never_read_as_markup() -> None:
    # A node reports its slots' model, versions and variant: '[link=...]' made `strata nodes show` print a terminal
    # hyperlink and '[bold red]' forge styling, and a model named '[/yellow]' made it fail with MarkupError.
    link = "digits[link=https://evil.example/]click me[/link]"
    slot = {
        "model": link,
        "active": {"version": "[/red]", "variant": "v[bold red]OK[/bold red]"},
        "activated_at": 100.0,
        "previous": {"version": "[/green]"},
        "probation": "[blink]",
    }
    node = {**NODE, "attestation": "[/bold]", "slots": [slot, {**slot, "model": "[/yellow]"}]}
    node["pins"] = {link: "[/cyan]"}
    screen = io.StringIO()
    console = Console(file=screen, width=240, force_terminal=True, color_system="truecolor")
    console.print(node_detail(node, 100.0))
    text = screen.getvalue()
    assert "\x1b]8;" not in text  # no hyperlink
    assert "\x1b[1;31m" not in text  # no forged bold red
    detail = shown(node_detail(node, 100.0))
    for sent in (link, "[/red]", "v[bold red]OK[/bold red]", "[/green]", "[blink]", "[/cyan]", "[/yellow]", "[/bold]"):
        assert sent in detail
