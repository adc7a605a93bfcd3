"""What `strata deploy` and `strata rollout create` share: the selector or an explicit `--all`, and `--wait`, a live
view of the fleet taking a version that ends when every node ran it, failed, or time ran out.

Exit codes of `--wait` (and `strata rollout watch`): 0 every node runs it, 1 a node failed (or no node matches a
deployment, or the rollout was rolled back, aborted or halted by a gate), 124 the timeout passed first (as timeout(1)
exits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import RenderableType
from rich.live import Live

from strata.cli.common import console, parse_duration
from strata.core.errors import ConfigError
from strata.core.wire import parse_selector

EXIT_FAILED = 1
EXIT_TIMEOUT = 124

SelectorOption = Annotated[
    str, typer.Option("--selector", "-l", help="Node labels k=v[,k=v]: the nodes this is for (or --all).")
]
AllOption = Annotated[bool, typer.Option("--all", help="Every node of the fleet (instead of --selector).")]
WaitOption = Annotated[
    bool,
    typer.Option(
        "--wait", help="Stay and show the nodes taking it until each runs it or failed; exit 1 if any failed."
    ),
]
TimeoutOption = Annotated[str, typer.Option("--timeout", help="How long --wait waits (exit 124 after it).")]

T = TypeVar("T")


def target_selector(selector: str, every_node: bool) -> dict[str, str]:
    """The selector of a deployment or rollout: `--selector k=v` or an explicit `--all`, never neither.

    Raises:
        ConfigError: neither or both, or a malformed selector.
    """
    labels = parse_selector(selector)
    if every_node and labels:
        raise ConfigError("give --selector or --all, not both")
    if not labels and not every_node:
        raise ConfigError("which nodes? give --selector k=v[,k=v], or --all for every node of the fleet")
    return labels


def watch(
    fetch: Callable[[], T],
    render: Callable[[T], RenderableType],
    finished: Callable[[T], bool],
    timeout_text: str,
    interval_s: float = 1.0,
) -> tuple[T, bool]:
    """Fetch and show a live view until `finished` says so or the timeout passes; return the last value and whether
    it finished. Off a terminal the view is printed once, at the end.

    Raises:
        ConfigError: the timeout is not a duration.
        StrataError: as `fetch` raises.
    """
    deadline = time.monotonic() + parse_duration(timeout_text)
    value = fetch()
    with Live(render(value), console=console, refresh_per_second=4, transient=False) as live:
        while not finished(value) and time.monotonic() < deadline:
            time.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))
            value = fetch()
            live.update(render(value))
    return value, finished(value)
