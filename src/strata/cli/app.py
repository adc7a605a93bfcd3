"""The `strata` command: one Typer app, one module per command group, registered here.

Modules import their heavy dependencies (FastAPI, onnxruntime, SQLAlchemy) inside the command functions,
so `strata --help` and the operator commands start fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated

import typer
from typer import _click as click  # Typer vendors Click: the type typer.main.get_command returns
from typer.core import TyperGroup

from strata import __version__
from strata.cli import agent as agent_cmd
from strata.cli import demo as demo_cmd
from strata.cli import deploy as deploy_cmd
from strata.cli import events as events_cmd
from strata.cli import gateway as gateway_cmd
from strata.cli import keys as keys_cmd
from strata.cli import model as model_cmd
from strata.cli import nodes as nodes_cmd
from strata.cli import optimize as optimize_cmd
from strata.cli import package as package_cmd
from strata.cli import pin as pin_cmd
from strata.cli import rollout as rollout_cmd
from strata.cli import server as server_cmd
from strata.cli import sim as sim_cmd
from strata.cli import telemetry as telemetry_cmd
from strata.cli import token as token_cmd
from strata.cli.common import fail
from strata.core.errors import StrataError

app = typer.Typer(
    name="strata",
    help="Edge AI inference platform: package, register, roll out, serve and observe models across a fleet.\n\n"
    "--server, --token and --ca go before the command or after it. Exit codes: 2 bad input or configuration, "
    "3 refused credential, 4 server unreachable, 5 package invalid, 6 not found, 7 conflict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Click's plain help: it wraps at any width without cutting option names, and prints help texts as written
    # (Rich markup would eat `strata[tpm]`).
    rich_markup_mode=None,
)

app.command("server")(server_cmd.server)
app.command("agent")(agent_cmd.agent)
app.command("gateway")(gateway_cmd.gateway)
app.add_typer(token_cmd.app, name="token")
app.add_typer(model_cmd.app, name="model")
app.add_typer(keys_cmd.app, name="keys")
app.add_typer(deploy_cmd.app, name="deploy")
app.add_typer(rollout_cmd.app, name="rollout")
app.add_typer(pin_cmd.app, name="pin")
app.add_typer(nodes_cmd.app, name="nodes")
app.command("events")(events_cmd.events)
app.add_typer(package_cmd.app, name="package")
app.command("telemetry")(telemetry_cmd.telemetry)
app.command("optimize")(optimize_cmd.optimize)
app.command("sim")(sim_cmd.sim)
app.command("demo")(demo_cmd.demo)


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


def command() -> click.Command:
    """The `strata` command tree. Every operator command (one with the operator --token option) also takes --ca,
    so `strata nodes list --ca ca.pem` works as well as `strata --ca ca.pem nodes list`; the commands themselves
    only declare --server and --token (`strata.cli.common`)."""
    root = typer.main.get_command(app)
    ca = _ca_option()
    for each in _commands(root):
        names = {param.name: param for param in each.params}
        token = names.get("token")
        if each is not root and token is not None and token.envvar == "STRATA_TOKEN" and "ca" not in names:
            each.params.append(ca)
    return root


def main() -> None:
    """Console-script entry point: strata errors become one line on stderr and a per-kind exit code."""
    try:
        command().main(prog_name="strata")
    except StrataError as exc:
        fail(exc)
    sys.exit(0)
