"""`strata model push|list|show`: build packages from an ONNX model and manage them in the registry."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from strata.cli.common import (
    JsonOption,
    ServerOption,
    TokenOption,
    ago,
    console,
    not_a_model,
    out,
    parse_duration,
    print_json,
    shown,
)
from strata.control_client import ControlClient
from strata.core.errors import ConfigError

app = typer.Typer(help="Models in the registry.", no_args_is_help=True)


def upload_with_progress(
    client: ControlClient, tar_path: Path, label: str, signature: tuple[str, str] | None = None
) -> dict[str, object]:
    """Push one package tar (with its release signature, if given) with a progress bar on the console."""
    size = tar_path.stat().st_size
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as progress:
        task = progress.add_task(f"upload {label}", total=size)
        return client.push_package(tar_path, lambda n: progress.advance(task, n), signature)


SignKeyOption = Annotated[
    Path | None,
    typer.Option(
        "--sign-key",
        help="Release private key: sign each package (OpenSSF model-signing bundle and TUF release role) and "
        "upload the signature with it.",
        exists=True,
        dir_okay=False,
    ),
]
ExpiresOption = Annotated[
    str, typer.Option("--expires", help="How long nodes accept the signature's TUF role (e.g. 365d).")
]


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
    sign_key: SignKeyOption = None,
    expires: ExpiresOption = "365d",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build a package per profile from MODEL (signature from the graph, golden outputs from onnxruntime)
    and upload each to the registry (signed with --sign-key, as a server with release keys requires)."""
    from strata.core.package import pack_tar
    from strata.core.policy import load_policy_file
    from strata.package_build import build_package

    lifetime_s = parse_duration(expires)

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
            signature = None
            if sign_key is not None:
                from strata.trust.release import sign_release

                signature = sign_release(package.path, sign_key, time.time(), lifetime_s).to_base64()
            tar_path = Path(tmp) / f"{profile_id}.tar"
            pack_tar(package, tar_path)
            label = f"{name} {version} {package.manifest.variant}"
            results.append(upload_with_progress(client, tar_path, label, signature))
    if as_json:
        print_json(results)
        return
    table = Table(title=f"pushed {name} {version}", title_justify="left")
    for column in ("variant", "digest", "bytes", "new", "signed"):
        table.add_column(column)
    for result in results:
        created = "yes" if result["created"] else "no"
        signed = "yes" if result.get("signature") else "no"
        table.add_row(str(result["variant"]), str(result["digest"])[:19], str(result["size"]), created, signed)
    out.print(table)


@app.command("sign")
def sign(
    package: Annotated[Path, typer.Argument(help="A package folder or its tar.", exists=True)],
    key: Annotated[
        Path, typer.Option("--key", help="The release private key (from `strata keys create`).", exists=True)
    ],
    expires: ExpiresOption = "365d",
    attach: Annotated[
        bool, typer.Option("--attach", help="Also attach the signature to the variant already uploaded.")
    ] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Sign PACKAGE with a release key, offline: writes PACKAGE.sig (an OpenSSF model-signing bundle, which
    `model_signing verify key` checks against the folder) and PACKAGE.targets.json (its TUF release role) beside
    it. A folder's manifest.json is rewritten in canonical JSON first: same digest, the bytes nodes assemble."""
    from strata.core.package import read_manifest, unpack_tar
    from strata.trust.release import sign_release

    lifetime_s = parse_duration(expires)
    with tempfile.TemporaryDirectory(prefix="strata-sign-") as tmp:
        folder = package if package.is_dir() else unpack_tar(not_a_model(package), Path(tmp) / "package").path
        signed = sign_release(folder, key, time.time(), lifetime_s)
        manifest = read_manifest(folder)
    bundle_path, role_path = signed.write(package)
    result: dict[str, object] = {
        "model": manifest.name,
        "version": manifest.version,
        "variant": manifest.variant,
        "digest": manifest.digest,
        "bundle": str(bundle_path),
        "release_role": str(role_path),
    }
    if attach:
        with ControlClient(server, token) as client:
            attached = client.attach_signature(manifest.name, manifest.version, manifest.variant, signed.to_base64())
        result["attached"] = attached["signature"]
    if as_json:
        print_json(result)
        return
    console.print(f"signed {manifest.name} {manifest.version} ({manifest.variant}) {manifest.digest[:19]}")
    out.print(str(bundle_path))
    out.print(str(role_path))
    if attach:
        console.print(f"attached to the registry as signature {str(result['attached'])[:16]}")


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
            shown(variant["id"]),
            shown(variant["profile"]),
            shown(variant["runtime"]),
            shown(variant["precision"]),
            str(variant["size"]),
            shown(variant["digest"][:19]),
            shown(metrics or "-"),
        )
    out.print(table)


@app.command("history")
def history(
    name: Annotated[str, typer.Argument(help="Model name.")],
    node: Annotated[str | None, typer.Option("--node", help="Only this node (name or id).")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many events.")] = 200,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Which versions of NAME ran where and when (activations, rollbacks, removals), newest first."""
    with ControlClient(server, token) as client:
        events = client.model_history(name, limit, node)
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
            shown(event["node"]),
            shown(event["kind"].replace("_", " ")),
            shown(event["version"] or "-"),  # versions and variant: what the node reported
            shown(event["previous_version"] or "-"),
            shown(event["variant"] or "-"),
        )
    out.print(table)
