"""The `strata` command: one Typer app, one module per command or command group, each imported only when its
command runs or help lists it (`COMMANDS`).

Modules import their heavy dependencies (FastAPI, onnxruntime, SQLAlchemy) inside the command functions too, so
`strata --help`, the operator commands and `strata agent` (which execs the lean agent process) start fast.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Final, get_args

import typer
from typer import _click as click  # Typer vendors Click: the type typer.main.get_command returns
from typer.core import TyperArgument, TyperGroup, TyperOption

from strata import __version__
from strata.cli.common import did_you_mean, fail
from strata.core.errors import StrataError

# Each command's module, imported when that command runs (or help lists it): `strata agent` on a node does not
# import what `strata demo` or `strata model push` need (about 0.3 s of CPU at every start, and every operator
# command paid it too). Name -> (module, attribute): the command's function, or the Typer app of a command group.
COMMANDS: Final = {  # in the order `strata --help` lists them: single commands, then groups
    "server": ("strata.cli.server", "server"),
    "agent": ("strata.cli.agent", "agent"),
    "gateway": ("strata.cli.gateway", "gateway"),
    "events": ("strata.cli.events", "events"),
    "telemetry": ("strata.cli.telemetry", "telemetry"),
    "optimize": ("strata.cli.optimize", "optimize"),
    "sim": ("strata.cli.sim", "sim"),
    "demo": ("strata.cli.demo", "demo"),
    "token": ("strata.cli.token", "app"),
    "model": ("strata.cli.model", "app"),
    "keys": ("strata.cli.keys", "app"),
    "deploy": ("strata.cli.deploy", "app"),
    "rollout": ("strata.cli.rollout", "app"),
    "pin": ("strata.cli.pin", "app"),
    "nodes": ("strata.cli.nodes", "app"),
    "package": ("strata.cli.package", "app"),
}


class _Commands(TyperGroup):
    """The root group: lists every command of `COMMANDS` and builds one (importing its module) when it is asked
    for, finished as `command` describes."""

    def list_commands(self, ctx: click.Context | None) -> list[str]:
        return list(COMMANDS)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        """Typer suggests close matches from the commands already built, none here: suggest from `COMMANDS`."""
        try:
            return super().resolve_command(ctx, args)
        except click.exceptions.UsageError as exc:
            hint = did_you_mean(args[0], COMMANDS) if args else ""
            if hint and "Did you mean" not in exc.message:
                exc.message = f"{exc.message.rstrip('.')}. {hint}"
            raise

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self.commands[cmd_name] = _finished(_load(cmd_name))
        return self.commands.get(cmd_name)


def _load(name: str) -> click.Command:
    """Command `name` as Typer makes it, with the root's settings (plain help, no pretty exceptions)."""
    module, attribute = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(rich_markup_mode=None, pretty_exceptions_enable=False, add_completion=False)
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
        group = typer.main.get_command(holder)
        assert isinstance(group, TyperGroup)
        return group.commands[name]
    holder.command(name)(target)
    return typer.main.get_command(holder)


app = typer.Typer(
    name="strata",
    cls=_Commands,
    help="Edge AI inference platform: package, register, roll out, serve and observe models across a fleet.\n\n"
    "--server, --token and --ca go before the command or after it. Exit codes: 2 bad input or configuration, "
    "3 refused credential, 4 server unreachable, 5 package invalid, 6 not found, 7 conflict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: it wraps at any width without cutting option names, and prints help texts as written
    # (Rich markup would eat `strata[tpm]`).
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"strata {__version__}")
        raise typer.Exit()


def _export(variable: str) -> Callable[[str | None], str | None]:
    """An option callback that hands the value on to the command through its environment variable: every
    operator command's --server/--token option and the control-plane client (--ca) read them."""

    def export(value: str | None) -> str | None:
        if value:
            os.environ[variable] = value
        return value

    return export


_CA_HELP = "The fleet CA the control plane's certificate chains to: the server's DATA_DIR/ca.pem."


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    ca: Annotated[
        str | None, typer.Option("--ca", envvar="STRATA_CA", callback=_export("STRATA_CA"), help=_CA_HELP)
    ] = None,
    server: Annotated[
        str | None,
        typer.Option("--server", envvar="STRATA_SERVER", callback=_export("STRATA_SERVER"), help="Control plane URL."),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="STRATA_TOKEN",
            callback=_export("STRATA_TOKEN"),
            help="Operator token.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """strata: optimize, sign, roll out, serve and observe models on device, near-edge and cloud tiers."""


@functools.cache
def _ca_option() -> click.Parameter:
    """The --ca option of the operator commands, made by Typer from a declaration like any other option."""
    options = typer.Typer(add_completion=False)

    @options.command()
    def _shared(
        ca: Annotated[
            str | None,
            typer.Option("--ca", envvar="STRATA_CA", callback=_export("STRATA_CA"), expose_value=False, help=_CA_HELP),
        ] = None,
    ) -> None:
        """Declares the option only."""

    [option] = typer.main.get_command(options).params
    return option


def _commands(command: click.Command) -> Iterator[click.Command]:
    yield command
    if isinstance(command, TyperGroup):
        for sub in command.commands.values():
            yield from _commands(sub)


def _one_value(param: TyperArgument | TyperOption) -> str | None:
    """How the help names one value of a repeatable option or argument (`<str>`, `<path>`), where Typer names the
    list (`<list[str]>`, `<list[Path]>`); None for a parameter that takes one value."""
    element = get_args(param.type_descriptor.annotation)
    if not (param.type_descriptor.is_list and len(element) == 1 and isinstance(element[0], type)):
        return None
    return f"<{param.type_descriptor.path_type if issubclass(element[0], Path) else element[0].__name__}>"


class _Argument(TyperArgument):
    """An argument as the help's text names it: NAME VERSION in the usage line (NODE [CHANGES]... for one that is
    optional and repeated), where Typer writes `{name} {version}`, and one value's type where Typer names a list."""

    def get_usage_pieces(self, ctx: click.Context) -> list[str]:
        name = (self.name or "").upper()
        name = name if self.required else f"[{name}]"
        return [f"{name}..." if self.nargs != 1 else name]

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return _one_value(self) or super().display_type_rich(ctx)


def _name_arguments_and_lists(command: click.Command) -> None:
    """Give `command`'s arguments and repeatable options the names its help text uses: an argument is NAME (the
    help says `NAME VERSION`), a repeatable option names one value (`--gate <str>`, `--extra <path>`)."""
    for param in command.params:
        if type(param) is TyperArgument and param.metavar is None:  # Typer's own class, which _Argument extends
            param.metavar = (param.name or "").upper() + ("..." if param.nargs != 1 else "")
            param.__class__ = _Argument  # it only words the help differently: no state of its own
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = _one_value(param)


def _finished(command: click.Command) -> click.Command:
    """A command (and every command under it) as the root offers it: with --ca when it is an operator command
    (one with the operator --token option), its arguments and repeatable options named as its help names them."""
    for each in _commands(command):
        names = {param.name: param for param in each.params}
        token = names.get("token")
        if token is not None and token.envvar == "STRATA_TOKEN" and "ca" not in names:
            each.params.append(_ca_option())
        _name_arguments_and_lists(each)
    return command


def command() -> click.Command:
    """The `strata` command tree. Every operator command also takes --ca, so `strata nodes list --ca ca.pem` works
    as well as `strata --ca ca.pem nodes list`; the commands themselves only declare --server and --token
    (`strata.cli.common`). Arguments and repeatable options are named in the help as its text names them. The
    commands are built as they are asked for (`COMMANDS`)."""
    root = typer.main.get_command(app)
    _name_arguments_and_lists(root)
    return root


# What pydantic puts before the message of an error a validator raised: Typer checks values with pydantic, and
# its refusal of `--scope god` read "Value error, 'god' is not one of 'read', 'admin'."
_PYDANTIC_PREFIX = re.compile(r"^(Value error|Assertion failed), ")


def usage_message(message: str) -> str:
    """A usage error's message without pydantic's prefix (`_PYDANTIC_PREFIX`)."""
    return _PYDANTIC_PREFIX.sub("", message)


def main() -> None:
    """Console-script entry point: strata errors become one line on stderr and a per-kind exit code; Click's usage
    errors are shown as Click shows them (exit code 2), in plain words (`usage_message`)."""
    try:
        code = command().main(prog_name="strata", standalone_mode=False)
    except StrataError as exc:
        fail(exc)
    except click.ClickException as exc:
        exc.message = usage_message(exc.message)
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    # Without standalone mode, Click returns the exit code of a `typer.Exit` (--help, --version) and the commands'
    # return value (None) otherwise.
    sys.exit(code if isinstance(code, int) else 0)
