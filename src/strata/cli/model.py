"""`strata model push|list|show`: build packages from an ONNX model and manage them in the registry."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from strata.cli.client import ControlClient
from strata.cli.common import JsonOption, ServerOption, TokenOption, ago, console, out, print_json
from strata.core.errors import ConfigError

app = typer.Typer(help="Models in the registry.", no_args_is_help=True)


def upload_with_progress(client: ControlClient, tar_path: Path, label: str) -> dict[str, object]:
    """Push one package tar with a progress bar on the console."""
    size = tar_path.stat().st_size
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as progress:
        task = progress.add_task(f"upload {label}", total=size)
        return client.push_package(tar_path, lambda n: progress.advance(task, n))


@app.command("push")
def push(
    model: Annotated[Path, typer.Argument(help="The ONNX model file.", exists=True, dir_okay=False)],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    version: Annotated[str, typer.Option("--version", help="Version of this release.")],
    profile: Annotated[
        list[str] | None,
        typer.Option("--profile", help="Hardware profile to package for (repeatable; default cpu-generic)."),
    ] = None,
    sample: Annotated[
        Path | None,
        typer.Option("--sample", help="Golden inputs: .npz with one array per model input.", exists=True),
    ] = None,
    extra: Annotated[
        list[Path] | None, typer.Option("--extra", help="Extra file to ship in the package (repeatable).", exists=True)
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            "--policy",
            help="Placement policy (YAML): allowed_regions, allowed_jurisdictions, required_attestation, data_class "
            "and CEL rules over `model` and `node`; it travels in every package.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build a package per profile from MODEL (signature from the graph, golden outputs from onnxruntime)
    and upload each to the registry."""
    from strata.core.package import build_package, pack_tar
    from strata.core.policy import load_policy_file

    placement = None
    if policy is not None:
        try:
            placement = load_policy_file(policy.read_text()).to_json()
        except OSError as exc:
            raise ConfigError(f"cannot read {policy}: {exc}") from exc
    profiles = profile or ["cpu-generic"]
    results = []
    with ControlClient(server, token) as client, tempfile.TemporaryDirectory(prefix="strata-push-") as tmp:
        for profile_id in profiles:
            package = build_package(
                model,
                Path(tmp) / profile_id,
                name=name,
                version=version,
                profile=profile_id,
                sample=sample,
                extra_files=extra or (),
                policy=placement,
            )
            tar_path = Path(tmp) / f"{profile_id}.tar"
            pack_tar(package, tar_path)
            results.append(upload_with_progress(client, tar_path, f"{name} {version} {package.manifest.variant}"))
    if as_json:
        print_json(results)
        return
    table = Table(title=f"pushed {name} {version}", title_justify="left")
    for column in ("variant", "digest", "bytes", "new"):
        table.add_column(column)
    for result in results:
        created = "yes" if result["created"] else "no"
        table.add_row(str(result["variant"]), str(result["digest"])[:19], str(result["size"]), created)
    out.print(table)


@app.command("list")
def list_models(server: ServerOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Every model with its versions and variants."""
    with ControlClient(server, token) as client:
        models = client.models()
    if as_json:
        print_json(models)
        return
    table = Table(title="models", title_justify="left")
    for column in ("model", "version", "variants"):
        table.add_column(column)
    for model in models:
        for version in model.get("versions", []):
            variants = ", ".join(v["id"] for v in version.get("variants", []))
            table.add_row(model["name"], version["version"], variants)
    out.print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version.")],
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One version's variants with their profiles, runtimes, sizes and metrics."""
    with ControlClient(server, token) as client:
        found = client.model_version(name, version)
    if as_json:
        print_json(found)
        return
    table = Table(title=f"{name} {version}", title_justify="left")
    for column in ("variant", "profile", "runtime", "precision", "bytes", "digest", "metrics"):
        table.add_column(column)
    for variant in found.get("variants", []):
        metrics = ", ".join(f"{k}={v}" for k, v in sorted((variant.get("metrics") or {}).items()))
        table.add_row(
            variant["id"],
            variant["profile"],
            variant["runtime"],
            variant["precision"],
            str(variant["size"]),
            variant["digest"][:19],
            metrics or "-",
        )
    out.print(table)


@app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    node: Annotated[str | None, typer.Option("--node", help="Only this node (name).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many events.")] = 200,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Which versions of NAME ran where and when (activations, rollbacks, removals), newest first."""
    with ControlClient(server, token) as client:
        events = client.model_history(name, limit)
    if node is not None:
        events = [e for e in events if e["node"] == node]
    if as_json:
        print_json(events)
        return
    table = Table(title=f"history of {name}", title_justify="left")
    for column in ("when", "node", "event", "version", "from", "variant"):
        table.add_column(column)
    now = time.time()
    for event in events:
        table.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["at"])) + f" ({ago(event['at'], now)})",
            event["node"],
            event["kind"].replace("_", " "),
            event["version"] or "-",
            event["previous_version"] or "-",
            event["variant"] or "-",
        )
    out.print(table)
