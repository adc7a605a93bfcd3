"""`strata package build|verify|show`: the model package format, offline; `strata package push`: upload a package
built (and signed, with `strata model sign`) elsewhere, with its signature, so the release key never sits on the
machine that pushes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from strata.cli.common import JsonOption, ServerOption, TokenOption, console, not_a_model, out, print_json, shown
from strata.core.errors import ModelLoadError, PackageError

if TYPE_CHECKING:
    from strata.core.package import Package

app = typer.Typer(
    help="Build, verify and inspect model packages (no server needed); push one built and signed elsewhere.",
    no_args_is_help=True,
)


@app.command("build")
def build(
    model: Annotated[Path, typer.Argument(help="The ONNX model file.", exists=True, dir_okay=False)],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    version: Annotated[str, typer.Option("--version", help="Version.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Package folder to create.")],
    profile: Annotated[str, typer.Option("--profile", help="Hardware profile.")] = "cpu-generic",
    sample: Annotated[
        Path | None, typer.Option("--sample", help="Golden inputs (.npz, one array per input).", exists=True)
    ] = None,
    extra: Annotated[list[Path] | None, typer.Option("--extra", help="Extra file to ship.", exists=True)] = None,
    tar: Annotated[Path | None, typer.Option("--tar", help="Also write the package as this tar.")] = None,
) -> None:
    """Build a package folder from an ONNX model; print its digest on the last line."""
    from strata.core.package import pack_tar
    from strata.package_build import build_package

    package = build_package(
        model, out_dir, name=name, version=version, profile=profile, sample=sample, extra_files=extra or ()
    )
    if tar is not None:
        pack_tar(package, tar)
    console.print(f"built {name} {version} ({package.manifest.variant}) in {out_dir}")
    typer.echo(package.digest)


@app.command("verify")
def verify(
    path: Annotated[Path, typer.Argument(help="Package folder or tar.", exists=True)],
    digest: Annotated[str | None, typer.Option("--digest", help="The digest it must have.")] = None,
    run: Annotated[
        bool,
        typer.Option(
            "--run/--no-run",
            help="Also load the model with its runtime and replay its golden inputs, as a node does before serving "
            "it (where that runtime exists on this machine).",
        ),
    ] = True,
) -> None:
    """Check every hash of a package (and its digest, when given), then load and run its model as a node would;
    exit non-zero if anything differs."""
    import tempfile

    from strata.core.package import read_package

    with tempfile.TemporaryDirectory(prefix="strata-verify-") as tmp:
        package = read_package(not_a_model(path), digest, workdir=Path(tmp) / "p")
        manifest = package.manifest
        console.print(
            f"[green]ok[/green] {shown(manifest.name)} {shown(manifest.version)} ({shown(manifest.variant)}): "
            "every file matches its hash"
        )
        if run:
            run_as_a_node(package)
        typer.echo(package.digest)


def run_as_a_node(package: Package) -> None:
    """Load the package's model as an agent does before serving it: its runtime, the manifest's signature against
    the model's, the golden inputs replayed. Said and skipped where this machine lacks the runtime.

    Raises:
        PackageError: the model does not load, does not match its manifest, or its golden outputs differ (every
            node would refuse the package the same way).
    """
    import time

    from strata.agent.runtime import load_and_check
    from strata.core.profiles import available_runtimes

    runtime = package.manifest.runtime
    if runtime not in available_runtimes():
        console.print(
            f"[yellow]not run[/yellow]: {shown(runtime)} is not usable on this machine; a node that has it loads the "
            "model and replays its golden inputs before serving it"
        )
        return
    started = time.monotonic()
    try:
        load_and_check(package)
    except ModelLoadError as exc:
        raise PackageError(f"a node would refuse this package: {exc}") from exc
    console.print(
        f"[green]ok[/green] {shown(runtime)} loads the model as its manifest declares it and the golden outputs match "
        f"({time.monotonic() - started:.1f}s)"
    )


@app.command("show")
def show(
    path: Annotated[Path, typer.Argument(help="Package folder or tar.", exists=True)],
    as_json: JsonOption = False,
) -> None:
    """Print a verified package's manifest: signature, files, golden check tolerances."""
    import tempfile

    from strata.core.package import read_package

    with tempfile.TemporaryDirectory(prefix="strata-show-") as tmp:
        package = read_package(not_a_model(path), workdir=Path(tmp) / "p")
    manifest = package.manifest
    if as_json:
        print_json({"digest": package.digest, "manifest": manifest.to_json()})
        return
    console.print(
        f"{manifest.name} {manifest.version} variant {manifest.variant}: profile {manifest.profile}, "
        f"runtime {manifest.runtime}, precision {manifest.precision}\ndigest {package.digest}"
    )
    table = Table(title="signature", title_justify="left")
    for column in ("kind", "name", "datatype", "shape"):
        table.add_column(column)
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            table.add_row(kind, spec.name, spec.datatype, str(list(spec.shape)))
    out.print(table)
    files = Table(title="files", title_justify="left")
    for column in ("path", "role", "bytes", "sha256"):
        files.add_column(column)
    for entry in manifest.files:
        files.add_row(entry.path, entry.role, str(entry.size), entry.sha256[:16])
    out.print(files)


@app.command("push")
def push(
    path: Annotated[Path, typer.Argument(help="A package folder or tar (from strata package build).", exists=True)],
    unsigned: Annotated[
        bool, typer.Option("--unsigned", help="Push without a signature (a server without release keys only).")
    ] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a package with the signature `strata model sign` wrote beside it (PATH.sig and PATH.targets.json):
    build and sign where the release key lives, push from any machine with the admin token."""
    import tempfile

    from strata.cli.model import upload_with_progress
    from strata.control_client import ControlClient
    from strata.core.errors import ConfigError
    from strata.core.package import pack_tar, read_package
    from strata.trust.release import SignedRelease, signature_paths

    signature = None
    not_a_model(path)
    if not unsigned:
        bundle_path, role_path = signature_paths(path)
        if not bundle_path.exists() or not role_path.exists():
            raise ConfigError(
                f"{path} is not signed: no {bundle_path.name} and {role_path.name} beside it; sign it where the "
                f"release key is (strata model sign {path} --key release.key) and bring both files along, or "
                "push with --unsigned to a server without release keys"
            )
        signature = SignedRelease.read(path).to_base64()
    with tempfile.TemporaryDirectory(prefix="strata-push-") as tmp:
        package = read_package(path, workdir=Path(tmp) / "package")  # every hash checked before a byte is sent
        tar = path
        if path.is_dir():
            tar = Path(tmp) / "package.tar"
            pack_tar(package, tar)
        manifest = package.manifest
        with ControlClient(server, token) as client:
            result = upload_with_progress(
                client, tar, f"{manifest.name} {manifest.version} {manifest.variant}", signature
            )
    if as_json:
        print_json(result)
        return
    signed = "signed" if result.get("signature") else "unsigned"
    state = "new" if result.get("created") else "already there"
    console.print(f"pushed {manifest.name} {manifest.version} ({manifest.variant}, {signed}, {state}) {package.digest}")
