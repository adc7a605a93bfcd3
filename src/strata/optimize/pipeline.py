"""The optimization pipeline's driver: load, build candidates with the passes, measure, judge, select, package.

The decisions (splitting the data, the gate verdicts, the selection) are the pure functions of `data`, `select`
and `gate`; this module only does the I/O around them and reports progress through a small interface.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from strata.core.errors import ConfigError, OptimizationError, PackageError, StrataError
from strata.core.hashing import sha256_file
from strata.core.package import TensorSpec
from strata.core.profiles import HostFacts, Profile, catalog, detect_profile, get_profile, read_host_facts
from strata.optimize.base import Candidate, Pass, PassContext, PassNotApplicable, isa_profile
from strata.optimize.data import Feeds, Splits, load_data, plan_splits
from strata.optimize.gate import Gate, parse_gate
from strata.optimize.measure import Timing, benchmark, peak_memory, percentiles, predict, save_feeds
from strata.optimize.packaging import build_variant_package, package_metrics
from strata.optimize.report import (
    PLOT_NAME,
    Report,
    VariantResult,
    headline_metrics,
    plot_accuracy_vs_throughput,
    write_report,
)
from strata.optimize.runners import OrtRunner, Runner, host_runtimes, open_runner
from strata.optimize.select import Measured, as_verdict, judge, select_variants
from strata.optimize.source import copy_checked_model
from strata.optimize.tasks import Task, choose_output, compare, get_task

Array = npt.NDArray[Any]
log = logging.getLogger(__name__)

BASELINE_ID = "fp32"
VARIANTS_DIR = "variants"
SOURCE_DIR = "source"  # under the run's work folder: the checked copy of the model that every pass reads
GOLDEN_SAMPLES = 4


class Progress(Protocol):
    """Where the pipeline says how far it got (the CLI draws Rich progress bars)."""

    def phase(self, name: str, total: int) -> None: ...

    def step(self, detail: str) -> None: ...


class SilentProgress:
    """Progress that shows nothing (tests, library use)."""

    def phase(self, name: str, total: int) -> None:
        return None

    def step(self, detail: str) -> None:
        return None


@dataclass(frozen=True)
class OptimizeRequest:
    """What `strata optimize` was asked to do."""

    model: Path
    name: str
    version: str
    task: str
    calibration: Path
    evaluation: Path
    out: Path
    targets: tuple[str, ...] = ()
    gate: str | None = None
    tokenizer: Path | None = None
    max_length: int = 128
    rounds: int = 5
    threads: int | None = 1
    seed: int = 0
    measure_memory: bool = True
    rank_by: str = "batch"  # which speed-up picks the fastest passing variant: RANK_BY


# The speed-up that ranks passing variants: at the serving batch (the agent batches requests under load), or at
# batch 1 (one request at a time, a node that is rarely busy).
RANK_BY = ("batch", "batch1")


@dataclass(frozen=True)
class Plan:
    """The request checked and resolved: task, gate, profiles."""

    task: Task
    gate: Gate
    host: Profile
    isa: Profile
    targets: tuple[Profile, ...]


def resolve(request: OptimizeRequest, facts: HostFacts) -> Plan:
    """Check the request and resolve names to objects.

    Raises:
        ConfigError: unknown task or profile, a bad gate, an output folder that is not empty, bad numbers.
    """
    task = get_task(request.task)
    gate = parse_gate(request.gate if request.gate is not None else task.default_gate)
    try:
        host = detect_profile(facts)
        targets = [get_profile(t) for t in request.targets] or [host, get_profile("cpu-generic")]
    except StrataError as exc:
        raise ConfigError(str(exc)) from exc
    unique = tuple({t.id: t for t in targets}.values())
    if request.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    if request.rank_by not in RANK_BY:
        raise ConfigError(f"--rank-by is one of {', '.join(RANK_BY)}, not {request.rank_by!r}")
    if request.out.exists() and (not request.out.is_dir() or any(request.out.iterdir())):
        raise ConfigError(f"output folder {request.out} is not empty")
    return Plan(task=task, gate=gate, host=host, isa=isa_profile(facts, catalog().values()), targets=unique)


@dataclass(frozen=True)
class Reference:
    """The fp32 model as the run uses it: the checked copy every pass reads, open in onnxruntime."""

    model: Path
    runner: OrtRunner
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def open_reference(model: Path, folder: Path) -> Reference:
    """Check the model's external data and copy it into `folder` (empty, the run's own: `copy_checked_model`),
    then open that copy in onnxruntime, with its input and output signature. Nothing loads the model before the
    check, and nothing after it reads the user's folder again.

    Raises:
        ConfigError: the file is missing, not ONNX, references external data outside its folder (or through a
            link, past a file's end, at a memory address), or uses types strata cannot serve.
    """
    if not model.is_file():
        raise ConfigError(f"model {model} does not exist")
    copy = copy_checked_model(model, folder)
    try:
        runner = OrtRunner(copy)
        inputs, outputs = runner.signature()
    except (OptimizationError, PackageError) as exc:
        raise ConfigError(f"{model} is not an ONNX model onnxruntime can load: {exc}") from exc
    return Reference(copy, runner, inputs, outputs)


def load_sets(request: OptimizeRequest, inputs: Sequence[TensorSpec]) -> tuple[Feeds, Feeds, Feeds, Splits]:
    """Calibration, evaluation and benchmark samples, never sharing one (see `plan_splits`).

    Raises:
        ConfigError: as `load_data` and `plan_splits`.
    """
    calibration = load_data(request.calibration, inputs, request.tokenizer, request.max_length)
    if request.calibration.resolve() == request.evaluation.resolve():
        splits = plan_splits(calibration.fingerprints(), None, seed=request.seed)
        evaluation = calibration
    else:
        evaluation = load_data(request.evaluation, inputs, request.tokenizer, request.max_length)
        splits = plan_splits(calibration.fingerprints(), evaluation.fingerprints(), seed=request.seed)
    return (
        calibration.take(splits.calibration),
        evaluation.take(splits.evaluation),
        evaluation.take(splits.benchmark),
        splits,
    )


def _batch_size(task: Task, inputs: Sequence[TensorSpec]) -> int:
    fixed = {spec.shape[0] for spec in inputs if spec.shape and spec.shape[0] != -1}
    if len(fixed) > 1:
        raise ConfigError(f"the model's inputs have different fixed batch sizes {sorted(fixed)}")
    return fixed.pop() if fixed else task.throughput_batch


def build_candidates(
    model: Path, workdir: Path, context: PassContext, passes: Sequence[Pass], progress: Progress
) -> tuple[list[Candidate], dict[str, str]]:
    """The original model plus what every applicable pass makes; the passes skipped, with why."""
    candidates = [
        Candidate(BASELINE_ID, model, "cpu-generic", "onnxruntime", "fp32", ("original",)),
    ]
    skipped: dict[str, str] = {}
    progress.phase("build", len(passes))
    for optimization in passes:
        with quantizer_output_to_log():
            _apply(optimization, model, workdir, context, candidates, skipped)
        progress.step(optimization.name)
    return candidates, skipped


class _RootToDebug(logging.Filter):
    """Takes what a library logs on the root logger below ERROR (`logging.warning(...)`: onnxruntime's quantizer
    does) off the terminal and into this module's log at debug level. An error stays on the terminal (it may be why
    a pass failed); strata's own loggers are named: they pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "root" or record.levelno >= logging.ERROR:
            return True
        log.debug("quantizer: %s", record.getMessage())
        return False


@contextlib.contextmanager
def quantizer_output_to_log() -> Iterator[None]:
    """While a pass runs, what onnxruntime's quantizer prints (its calibrators' "Collecting tensor data and making
    histogram ...") and logs on the root logger below ERROR goes to the log at debug level, not among the progress
    bars, and so do NNCF's progress bars (Rich, on stdout; its logger is routed on import, see
    `strata.core.openvino_import`); and stdout stays the report's. Everything is put back however the block ends.
    Process-wide (sys.stdout, the root logger): one pass at a time, and what another thread prints meanwhile goes
    to the log as well."""
    root = logging.getLogger()
    # Without a handler on the root logger, `logging.warning()` would add a stderr one (`basicConfig`) for good.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    keeper = _RootToDebug()
    root.addFilter(keeper)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        root.removeFilter(keeper)
        if placeholder is not None:
            root.removeHandler(placeholder)
        for line in printed.getvalue().splitlines():
            if line.strip():
                log.debug("quantizer: %s", line)


def _apply(
    optimization: Pass,
    model: Path,
    workdir: Path,
    context: PassContext,
    candidates: list[Candidate],
    skipped: dict[str, str],
) -> None:
    reason = optimization.skip_reason(context)
    if reason is not None:
        skipped[optimization.name] = reason
        return
    folder = workdir / optimization.name
    folder.mkdir(parents=True, exist_ok=True)
    try:
        candidates.extend(optimization.apply(model, folder, context))
    except PassNotApplicable as exc:  # skipped, with the pass's own reason
        skipped[optimization.name] = str(exc)
    except StrataError as exc:  # the pass as a whole could not run; the others still can
        skipped[optimization.name] = f"failed: {exc}"


@dataclass
class _Measurement:
    accuracy: dict[str, float]
    error: str | None = None
    timing: Timing | None = None
    timing_batch1: Timing | None = None
    memory: int | None = None


def _size(candidate: Candidate) -> int | None:
    try:
        return sum(path.stat().st_size for path in candidate.files)
    except (OSError, StrataError):  # gone, or names data it may not (refused when it is packaged)
        return None


def measure_candidates(
    candidates: Sequence[Candidate],
    *,
    reference: Runner,
    task: Task,
    output: str,
    evaluation: Feeds,
    bench: Feeds,
    batch: int,
    request: OptimizeRequest,
    runtimes: frozenset[str],
    workdir: Path,
    progress: Progress,
) -> dict[str, _Measurement]:
    """Accuracy, timing and memory of every candidate whose runtime is on this host. A candidate that does not
    load or run is recorded with its error; the others are still measured.

    Raises:
        ConfigError: the fp32 original does not run on the evaluation samples, or its output gives no prediction per
            sample: the model and data the user gave.
        OptimizationError: the fp32 original cannot be timed.
    """
    try:
        expected = predict(reference, evaluation, task, output, batch)
    except OptimizationError as exc:
        raise ConfigError(f"the model cannot be evaluated on its data: {exc}") from exc
    results: dict[str, _Measurement] = {}
    runners: dict[str, Runner] = {}
    measurable = [c for c in candidates if c.error is None and c.runtime in runtimes]
    progress.phase("evaluate", len(measurable))
    for candidate in measurable:
        try:
            # The baseline gets its own runner: timed with the same thread count as every other variant.
            runner = open_runner(candidate.model_path, candidate.runtime, request.threads, candidate.precision)
            got = predict(runner, evaluation, task, output, batch)
            results[candidate.id] = _Measurement(compare(task, expected, got, evaluation.labels))
            runners[candidate.id] = runner
        except StrataError as exc:
            results[candidate.id] = _Measurement({}, error=f"does not run here: {exc}")
        progress.step(candidate.id)
    progress.phase("benchmark", request.rounds * len(runners) * (2 if batch != 1 else 1))
    # a variant that evaluated but fails while timed (a batch it cannot take, say) fails alone, with its reason;
    # the original's failure is the run's
    failures: dict[str, str] = {}
    timings = benchmark(
        runners, bench, baseline=BASELINE_ID, batch=batch, rounds=request.rounds, on_round=progress.step,
        failures=failures,
    )  # fmt: skip
    for cid, timing in timings.items():
        results[cid].timing = timing
    if batch != 1:  # the same interleaved method at batch 1: one request at a time, as most edge serving sees it
        timed = {cid: runner for cid, runner in runners.items() if cid not in failures}
        singles = benchmark(
            timed, bench, baseline=BASELINE_ID, batch=1, rounds=request.rounds, on_round=progress.step,
            failures=failures,
        )  # fmt: skip
        for cid, timing in singles.items():
            results[cid].timing_batch1 = timing
    for cid, error in failures.items():  # its accuracy stays in the report; it is not timed, so it cannot pass
        results[cid].error, results[cid].timing, results[cid].timing_batch1 = f"does not time here: {error}", None, None
        runners.pop(cid, None)
    if request.measure_memory:
        progress.phase("memory", len(runners))
        feeds_npz = save_feeds(bench.batch(0, batch), workdir / "memory-feeds.npz")
        by_id = {c.id: c for c in measurable}
        for cid in runners:
            try:
                variant = by_id[cid]
                results[cid].memory = peak_memory(
                    variant.model_path, variant.runtime, feeds_npz, request.threads, variant.precision
                )
            except OptimizationError:
                results[cid].memory = None
            progress.step(cid)
    return results


def _result(candidate: Candidate, measured: _Measurement | None, gate: Gate) -> VariantResult:
    timing = measured.timing if measured is not None else None
    single = (measured.timing_batch1 or measured.timing) if measured is not None else None
    error = candidate.error or (measured.error if measured is not None else None)
    verified = measured is not None and measured.error is None
    result = VariantResult(
        id=candidate.id,
        path=None,
        profile=candidate.profile,
        runtime=candidate.runtime,
        precision=candidate.precision,
        passes=candidate.passes,
        verified=verified,
        accuracy=measured.accuracy if measured is not None else {},
        latency_ms=percentiles(timing.latencies_ms) if timing is not None else None,
        throughput=timing.throughput if timing is not None else None,
        speedup=timing.speedup if timing is not None else None,
        size_bytes=_size(candidate) if candidate.error is None else None,
        peak_memory_bytes=measured.memory if measured is not None else None,
        gate="failed",
        reason=None,
        notes=candidate.notes,
        throughput_batch1=single.throughput if single is not None else None,
        speedup_batch1=single.speedup if single is not None else None,
    )
    verdict = judge(result.values(), gate, verified=verified, error=error)
    return replace(result, gate=verdict.gate, reason=verdict.reason)


def write_variants(
    results: Sequence[VariantResult],
    candidates: Mapping[str, Candidate],
    *,
    request: OptimizeRequest,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    golden: Mapping[str, Array],
    host_profile: str,
    progress: Progress,
) -> list[VariantResult]:
    """A package under DIR/variants/ID for each passing variant, the bare model files for unverified ones."""
    written = []
    keep = [r for r in results if r.gate != "failed"]
    progress.phase("package", len(keep))
    for result in results:
        if result.gate == "failed":
            written.append(result)
            continue
        candidate = candidates[result.id]
        rel = f"{VARIANTS_DIR}/{result.id}"
        target = request.out / rel
        if result.gate == "unverified":
            try:
                files = candidate.files
            except StrataError as exc:
                written.append(replace(result, gate="failed", reason=f"cannot be kept: {exc}"))
                progress.step(result.id)
                continue
            target.mkdir(parents=True, exist_ok=True)
            folder = candidate.model_path.parent
            for path in files:  # an IR's .bin beside its .xml; external data where the model names it
                copy = target / (path.relative_to(folder) if path.is_relative_to(folder) else path.name)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, copy)
            written.append(replace(result, path=f"{rel}/{candidate.model_path.name}"))
        else:
            try:
                build_variant_package(
                    candidate.files,
                    target,
                    name=request.name,
                    version=request.version,
                    profile=result.profile,
                    runtime=result.runtime,
                    precision=result.precision,
                    variant=result.id,
                    inputs=inputs,
                    outputs=outputs,
                    sample=golden,
                    metrics=package_metrics(result, host_profile),
                )
                written.append(replace(result, path=rel))
            except StrataError as exc:
                shutil.rmtree(target, ignore_errors=True)
                written.append(replace(result, gate="failed", reason=f"cannot be packaged: {exc}"))
        progress.step(result.id)
    return written


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what `mkdir(parents=True)` creates)."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def run_optimize(
    request: OptimizeRequest,
    passes: Sequence[Pass],
    *,
    facts: HostFacts | None = None,
    progress: Progress | None = None,
    runtimes: frozenset[str] | None = None,
) -> Report:
    """Run the whole pipeline and write DIR (packages, report.json, the plot). Returns the report.

    The output folder, when this run made it, is removed again however the run fails (Ctrl-C too): a half-made
    folder would only make the next run refuse it as not empty. One that was there before is never removed.

    Raises:
        ConfigError: bad model, data, gate, profiles or output folder, or a model whose fp32 original does not
            run on its evaluation data or gives no prediction per sample.
        OptimizationError: the original model cannot be timed.
    """
    progress = progress or SilentProgress()
    facts = facts or read_host_facts()
    plan = resolve(request, facts)
    created = _first_missing(request.out)
    request.out.mkdir(parents=True, exist_ok=True)
    try:
        return _optimize_into(request, plan, passes, progress, runtimes)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _optimize_into(
    request: OptimizeRequest,
    plan: Plan,
    passes: Sequence[Pass],
    progress: Progress,
    runtimes: frozenset[str] | None,
) -> Report:
    """`run_optimize` once the request is resolved and its output folder is there."""
    workdir = Path(tempfile.mkdtemp(prefix=".work-", dir=request.out))
    try:
        (workdir / SOURCE_DIR).mkdir()
        reference = open_reference(request.model, workdir / SOURCE_DIR)
        output = choose_output(plan.task, reference.outputs)
        calibration, evaluation, bench, splits = load_sets(request, reference.inputs)
        batch = _batch_size(plan.task, reference.inputs)
        inputs, outputs = reference.inputs, reference.outputs
        sha, size = sha256_file(reference.model)
        runtimes = runtimes if runtimes is not None else host_runtimes()
        context = PassContext(
            task=plan.task.name, host=plan.isa, targets=plan.targets, calibration=calibration, seed=request.seed
        )
        candidates, skipped = build_candidates(reference.model, workdir, context, passes, progress)
        measured = measure_candidates(
            candidates,
            reference=reference.runner,
            task=plan.task,
            output=output,
            evaluation=evaluation,
            bench=bench,
            batch=batch,
            request=request,
            runtimes=runtimes,
            workdir=workdir,
            progress=progress,
        )
        results = [_result(c, measured.get(c.id), plan.gate) for c in candidates]
        golden = bench.batch(0, min(GOLDEN_SAMPLES, len(bench)))
        results = write_variants(
            results,
            {c.id: c for c in candidates},
            request=request,
            inputs=inputs,
            outputs=outputs,
            golden=golden,
            host_profile=plan.host.id,
            progress=progress,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    selection = select_variants(
        plan.targets,
        [
            Measured(
                r.id,
                r.profile,
                r.runtime,
                r.precision,
                as_verdict(r.gate),
                r.speedup_batch1 if request.rank_by == "batch1" else r.speedup,
            )
            for r in results
        ],
        catalog(),
    )
    report = Report(
        model={
            "name": request.name,
            "version": request.version,
            "file": request.model.name,
            "sha256": sha,
            "size_bytes": size,
        },
        host_profile=plan.host.id,
        task=plan.task.name,
        gate=str(plan.gate),
        targets=tuple(t.id for t in plan.targets),
        data={
            **splits.to_json(),
            "calibration": str(request.calibration),
            "evaluation": str(request.evaluation),
            "max_length": request.max_length if request.tokenizer is not None else None,
        },
        benchmark={
            "batch": batch,
            "batches": sorted({batch, 1}),
            "selection_key": "speedup at batch 1" if request.rank_by == "batch1" else f"speedup at batch {batch}",
            "rounds": request.rounds,
            "threads": request.threads,
            "baseline": BASELINE_ID,
            "isa_profile": plan.isa.id,
            "method": "interleaved rounds, fp32 timed before and after every variant; speedup = median over rounds "
            "of the variant's throughput / the mean of those two fp32 throughputs; run once at `batch` (speedup, "
            "throughput) and once at batch 1 (speedup_batch1, throughput_batch1), each batch cycling over the timed "
            "samples",
        },
        variants=tuple(results),
        selected=selection.chosen,
        selection_notes={
            target: why if target == plan.host.id else f"{why}; measured on this {plan.host.id} host"
            for target, why in selection.why.items()
        },
        skipped_passes=skipped,
    )
    write_report(report, request.out)
    metrics = headline_metrics(plan.task.name)
    if metrics:
        plot_accuracy_vs_throughput(results, metrics[0], list(selection.chosen.values()), request.out / PLOT_NAME)
    return report
