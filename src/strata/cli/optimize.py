"""`strata optimize`: one ONNX model in, measured variants and one selected package per hardware profile out."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from strata.cli.common import (
    JsonOption,
    ServerOption,
    TokenOption,
    console,
    out,
    parse_duration,
    print_json,
    shown,
)
from strata.cli.model import ExpiresOption, SignKeyOption
from strata.core.errors import ConfigError

if TYPE_CHECKING:
    from strata.control_client import ControlClient
    from strata.optimize.report import Report


class RichProgress:
    """The pipeline's progress as Rich bars on stderr, one per phase."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: TaskID | None = None
        self._phase = ""

    def phase(self, name: str, total: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, description=f"{self._phase}: done")
        self._phase = name
        self._task = self._progress.add_task(name, total=max(total, 1))

    def step(self, detail: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=1, description=f"{self._phase}: {detail}")


def push_selected(
    report: Report,
    out_dir: Path,
    client: ControlClient,
    sign_key: Path | None = None,
    lifetime_s: float = 365 * 86400.0,
) -> list[dict[str, Any]]:
    """Upload, per target profile, its selected variant as a package built for that profile, signed with the
    release key `sign_key` when one is given (its TUF role valid for `lifetime_s`).

    The package id is `<profile>-<variant>`, so a node of that profile finds a package built for exactly it
    (which `rank_variants` prefers), and nodes of other profiles fall back to a compatible one.

    Raises:
        ConfigError: a selected variant has no package (unverified variants are not packaged), or the key cannot
            be read.
        PackageError, PackageBuildError: the package cannot be rebuilt.
        SignatureError: model-signing could not sign it.
        TransportError, AuthError, Conflict: as `ControlClient.push_package`.
    """
    from strata.cli.model import upload_with_progress
    from strata.core.package import pack_tar
    from strata.optimize.packaging import repackage_for_target

    results = []
    with tempfile.TemporaryDirectory(prefix="strata-optimize-push-") as tmp:
        for profile, variant_id in sorted(report.selected.items()):
            variant = report.variant(variant_id)
            if variant.gate != "passed" or variant.path is None:
                raise ConfigError(f"variant {variant_id} selected for {profile} has no package ({variant.gate})")
            package = repackage_for_target(
                out_dir / variant.path, Path(tmp) / profile, profile=profile, variant=f"{profile}-{variant_id}"
            )
            signature = None
            if sign_key is not None:
                from strata.trust.release import sign_release

                signature = sign_release(package.path, sign_key, time.time(), lifetime_s).to_base64()
            tar_path = Path(tmp) / f"{profile}.tar"
            pack_tar(package, tar_path)
            label = f"{package.manifest.name} {package.manifest.version} {package.manifest.variant}"
            results.append(upload_with_progress(client, tar_path, label, signature))
    return results


def optimize(
    model: Annotated[Path, typer.Argument(help="The fp32 ONNX model.", dir_okay=False)],
    name: Annotated[str, typer.Option("--name", help="Model name.")],
    version: Annotated[str, typer.Option("--version", help="Version of this release.")],
    task: Annotated[str, typer.Option("--task", help="classification, embedding or regression.")],
    calibration: Annotated[
        Path,
        typer.Option("--calibration", help="Calibration DATA: .npz of input feeds, or text, one sentence a line."),
    ],
    evaluation: Annotated[
        Path, typer.Option("--eval", help="Evaluation DATA (the same file as --calibration is split in two).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Empty or new folder for packages, report.json, plot.")],
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            help="Hardware profile to select a variant for (repeatable; default: this host's profile and cpu-generic).",
        ),
    ] = None,
    gate: Annotated[
        str | None, typer.Option("--gate", help="Accuracy gate, e.g. 'mean_cosine>=0.99,min_cosine>=0.97'.")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option("--tokenizer", help="tokenizer.json (tokenizers) for text DATA.")
    ] = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Pad/truncate text to this many tokens.")] = 128,
    passes: Annotated[
        list[str] | None,
        typer.Option(
            "--pass", help="Run only these passes (repeatable): graph, fp16, dynamic, dynamic-fused, static, openvino."
        ),
    ] = None,
    rounds: Annotated[int, typer.Option("--rounds", help="Interleaved benchmark rounds.")] = 5,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="Threads per inference while measuring; 0 = the runtime's choice. One thread per variant keeps "
            "the ratios steady on a machine that runs other work.",
        ),
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data split.")] = 0,
    rank_by: Annotated[
        str,
        typer.Option(
            "--rank-by",
            help="Which speed-up picks the fastest passing variant: batch (at the serving batch; the agent batches "
            "requests under load) or batch1 (one request at a time).",
        ),
    ] = "batch",
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure each variant's peak memory in a child process.")
    ] = True,
    push: Annotated[bool, typer.Option("--push", help="Upload the selected package of each target.")] = False,
    sign_key: SignKeyOption = None,
    expires: ExpiresOption = "365d",
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Build optimized variants of MODEL (graph optimization, fp16, int8 dynamic/static, OpenVINO), measure each
    on this host against the fp32 original, gate them on accuracy and select the fastest passing one per target
    hardware profile."""
    from strata.optimize.passes import passes_named
    from strata.optimize.pipeline import OptimizeRequest, run_optimize
    from strata.optimize.report import PLOT_NAME, REPORT_NAME, no_plot_reason, report_table

    request = OptimizeRequest(
        model=model,
        name=name,
        version=version,
        task=task,
        calibration=calibration,
        evaluation=evaluation,
        out=out_dir,
        targets=tuple(target or ()),
        gate=gate,
        tokenizer=tokenizer,
        max_length=max_length,
        rounds=rounds,
        threads=threads or None,
        seed=seed,
        measure_memory=memory,
        rank_by=rank_by,
    )
    lifetime_s = parse_duration(expires)
    if sign_key is not None:
        if not push:
            raise ConfigError("--sign-key signs the packages that --push uploads: add --push")
        from strata.trust.signing import load_private_key

        load_private_key(sign_key)  # a public key or another file fails now, not after minutes of work
    if push:
        from strata.control_client import ControlClient

        ControlClient(server, token).close()  # fail on missing --server/--token before minutes of work
    selected_passes = passes_named(passes)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bars:
        report = run_optimize(request, selected_passes, progress=RichProgress(bars))
    pushed: list[dict[str, Any]] = []
    if push:
        from strata.control_client import ControlClient

        with ControlClient(server, token) as client:
            pushed = push_selected(report, out_dir, client, sign_key, lifetime_s)
    if as_json:
        print_json({"report": report.to_json(), "pushed": pushed})
        return
    out.print(report_table(report, out.width))
    # the notes and reasons are text (`pip install 'strata[optimize]'`), not Rich markup
    for profile, variant_id in report.selected.items():
        note = shown(report.selection_notes.get(profile, ""))
        out.print(f"selected for {shown(profile)}: [bold]{shown(variant_id)}[/bold] ({note})")
    for profile in report.targets:
        if profile not in report.selected:
            out.print(f"[red]no variant for {shown(profile)}[/red]: {shown(report.selection_notes.get(profile, ''))}")
    for pass_name, why in report.skipped_passes.items():
        out.print(f"pass {shown(pass_name)} skipped: {shown(why)}")
    plot = out_dir / PLOT_NAME
    plot_line = shown(plot) if plot.exists() else f"none ({shown(no_plot_reason(report))})"
    out.print(f"report: {shown(out_dir / REPORT_NAME)}; plot: {plot_line}")
    if pushed:
        table = Table(title=f"pushed {name} {version}", title_justify="left")
        for column in ("variant", "digest", "bytes", "new", "signed"):
            table.add_column(column)
        for result in pushed:
            created = "yes" if result["created"] else "no"
            signed = "yes" if result.get("signature") else "no"
            table.add_row(str(result["variant"]), str(result["digest"])[:19], str(result["size"]), created, signed)
        out.print(table)
