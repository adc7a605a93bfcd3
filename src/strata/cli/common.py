"""Shared pieces of the operator commands: connection options, output, and error-to-exit-code mapping."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from strata.core.errors import (
    AuthError,
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    OptimizationError,
    PackageBuildError,
    PackageError,
    ProfileError,
    StrataError,
    TransportError,
)
from strata.core.policy import PolicyError
from strata.core.wire import ProtocolError
from strata.core.words import parse_duration as parse_duration  # re-exported: every command reads durations so
from strata.core.words import printable

# Process exit codes, one range per kind of failure, so scripts can tell them apart. The first entry an error is an
# instance of gives its code: a subclass goes before its parent.
EXIT_CODES: dict[type[StrataError], int] = {
    ConfigError: 2,
    ProtocolError: 2,  # input the CLI parses itself: a selector that is not k=v
    ProfileError: 2,  # an unknown --profile
    PolicyError: 2,  # a --policy file with unknown keys, a rule without a name, an attestation level that is none
    # The model, samples and extra files given to `package build` or `model push` (one that does not load, samples
    # that do not fit, a golden run that fails): the caller's input, as `strata optimize` says of the same model.
    # 5 is for a package that fails its checks.
    PackageBuildError: 2,
    # A model `strata optimize` cannot run or time on this host (its fp32 original on its own data is already a
    # ConfigError): what it was given, not a package, a credential or the network.
    OptimizationError: 2,
    AuthError: 3,
    Forbidden: 3,
    TransportError: 4,
    PackageError: 5,
    NotFound: 6,
    Conflict: 7,
}


class TerminalConsole(Console):
    """A Rich console that shows every string it is given as text: what the control plane answers is what nodes,
    models and callers claimed (an agent version, a failure reason, a label), and a claim must not reach the
    operator's terminal as an escape sequence (moving the cursor, rewriting a line, retitling the window, a hidden
    hyperlink) or a bidirectional override. Each hidden character but newlines and tabs is written out
    (`strata.core.words.printable`) before markup is read, so the CLI's own markup still works; strings from the
    API are also passed through `shown` (markup escaped, newlines written out) where they are placed. Emoji codes
    (`:name:`) are left as typed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        """Rich turns every string it prints (and every table cell) into `Text` here."""
        return super().render_str(printable(text, keep="\n\t"), **kwargs)


def shown(value: object) -> str:
    """A value from the API (or a file) as one line of text for Rich markup: its own brackets escaped, so a label
    `[red]` or `[link=...]` shows as typed, and every hidden character written out, newlines included."""
    return escape(printable(str(value)))


# Off a terminal (pipes, CI logs) Rich would assume 80 columns and cut the fleet table; be wider there.
console = TerminalConsole(stderr=True, width=None if sys.stderr.isatty() else 160)
out = TerminalConsole(width=None if sys.stdout.isatty() else 160)

ServerOption = Annotated[
    str | None,
    typer.Option("--server", envvar="STRATA_SERVER", help="Control plane URL (https://HOST:8700)."),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="STRATA_TOKEN",
        help="Operator token: DATA_DIR/admin.token, or one from `strata token api`.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
LogFormatOption = Annotated[
    str, typer.Option("--log-format", help="text, or json: one JSON object per line (time, level, logger, message).")
]


def load_config_file(ctx: typer.Context, path: Path | None) -> Path | None:
    """The --config callback: a TOML file's keys become the command's defaults, so the command line and the
    environment still win over it. Keys are the long option names (`data-dir = "/var/lib/strata"`, `label =
    ["site=berlin"]`, `encrypt-at-rest = false`).

    Raises:
        typer.BadParameter: the file cannot be read, is not TOML, or names an option the command does not have
            (a usage error: exit code 2).
    """
    if path is None:
        return None
    import tomllib

    try:
        with path.open("rb") as fh:
            values = tomllib.load(fh)
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise typer.BadParameter(f"{path} is not TOML: {exc}") from exc
    options = {
        opt.removeprefix("--"): param.name
        for param in ctx.command.params
        if param.name and param.name != "config"
        for opt in (*param.opts, *param.secondary_opts)
        if opt.startswith("--") and not opt.startswith("--no-")
    }
    defaults: dict[str, Any] = {}
    for key, value in values.items():
        name = options.get(key.replace("_", "-"))
        if name is None:
            known = ", ".join(sorted(options))
            raise typer.BadParameter(f"{path}: unknown key {key!r} (the keys are this command's options: {known})")
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        is_eager=True,
        callback=load_config_file,
        dir_okay=False,
        help="A TOML file of this command's options (keys: the long option names); flags and environment "
        "variables override it.",
    ),
]


def exit_code(error: StrataError) -> int:
    for kind, code in EXIT_CODES.items():
        if isinstance(error, kind):
            return code
    return 1


def fail(error: StrataError) -> None:
    """Print a strata error as one line and exit with its code."""
    console.print(f"[red]error:[/red] {shown(error)}")  # a message may hold brackets: strata[postgres]
    raise SystemExit(exit_code(error))


def not_a_model(path: Path) -> Path:
    """`path`, named where a command wants a package (a folder or tar from `strata package build`).

    Raises:
        ConfigError: it is an ONNX model file, with the commands that package one.
    """
    if path.suffix.lower() == ".onnx" and path.is_file():
        raise ConfigError(
            f"{path} is a model, not a package: `strata model push {path} --name NAME --version VERSION"
            " --sign-key KEY` packages, signs and uploads it; `strata package build` packages it to sign and push"
            " later"
        )
    return path


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """ "Did you mean 'list'?" for the names close to a mistyped `word`, "" when none is."""
    import difflib

    close = difflib.get_close_matches(word, list(names))
    return f"Did you mean {', '.join(map(repr, close))}?" if close else ""


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def ago(timestamp: float | None, now: float | None = None) -> str:
    """'12s ago', '3m ago', 'never'."""
    if timestamp is None:
        return "never"
    seconds = max(0.0, (now if now is not None else time.time()) - timestamp)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def parse_label_options(items: list[str]) -> dict[str, str]:
    """`--label k=v` options -> {k: v}.

    Raises:
        ConfigError: an option that is not k=v.
    """
    from strata.core.wire import ProtocolError, parse_selector

    labels: dict[str, str] = {}
    for item in items:
        try:
            parsed = parse_selector(item)
        except ProtocolError:  # it said "selector term 'ring' is not k=v" of a label
            parsed = {}
        if not parsed:
            raise ConfigError(f"--label {item!r} is not k=v")
        labels.update(parsed)
    return labels
