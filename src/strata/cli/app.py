"""The `strata` command: one Typer app, one module per command group, registered here.

Modules import their heavy dependencies (FastAPI, onnxruntime, SQLAlchemy) inside the command functions,
so `strata --help` and the operator commands start fast.
"""

from __future__ import annotations

import os
import sys

import typer

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
    help="Edge AI inference platform: package, register, roll out, serve and observe models across a fleet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    ca: str | None = typer.Option(
        None,
        "--ca",
        envvar="STRATA_CA",
        help="The fleet CA (DATA_DIR/ca.pem) the control plane's certificate chains to.",
    ),
) -> None:
    """strata: optimize, sign, roll out, serve and observe models on device, near-edge and cloud tiers."""
    if ca:
        os.environ["STRATA_CA"] = ca  # every command's control-plane client reads it


def main() -> None:
    """Console-script entry point: strata errors become one line on stderr and a per-kind exit code."""
    try:
        app()
    except StrataError as exc:
        fail(exc)
    sys.exit(0)
