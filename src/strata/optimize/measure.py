"""Measuring variants on this host: predictions for accuracy, interleaved timing, peak memory in a child.

Timing is interleaved: every round runs each variant once (throughput batch, then single-sample latency runs),
in an order that rotates from round to round, with the fp32 baseline timed between every two variants. Each
variant's speedup is the median over rounds of its throughput divided by the baseline's throughput measured
just before and just after it, so load from other processes on a shared machine falls on both sides of each
ratio; ratios are what this module vouches for, not absolute times.
"""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from strata.core.errors import OptimizationError, StrataError
from strata.optimize.data import Feeds
from strata.optimize.runners import Runner
from strata.optimize.tasks import Task, prediction, shape_problem

Array = npt.NDArray[Any]


def predict(runner: Runner, feeds: Feeds, task: Task, output: str, batch: int) -> Array:
    """The task's predictions for every sample of `feeds`, run `batch` samples at a time.

    Raises:
        OptimizationError: a run fails or lacks the output, or the output does not hold one row per sample of the
            batch (or the same shape for every batch), so it gives no prediction per sample.
    """
    parts = []
    for start in range(0, len(feeds), batch):
        chunk = feeds.batch(start, start + batch)
        result = runner.run(chunk)
        if output not in result:
            raise OptimizationError(f"the variant has no output {output!r}")
        value = np.asarray(result[output])
        problem = shape_problem(task, output, value, min(start + batch, len(feeds)) - start)
        if problem is not None:
            raise OptimizationError(problem)
        parts.append(prediction(task, value, chunk, feeds.mask))
    if len({part.shape[1:] for part in parts}) > 1:
        shapes = sorted({str(list(part.shape[1:])) for part in parts})
        raise OptimizationError(
            f"output {output} gives predictions of a different shape per batch (per sample: {', '.join(shapes)})"
        )
    return np.concatenate(parts)


@dataclass(frozen=True)
class Timing:
    """Timing of one variant over all rounds."""

    latencies_ms: tuple[float, ...]
    throughputs: tuple[float, ...]
    speedups: tuple[float, ...]

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 50))

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 95))

    @property
    def throughput(self) -> float:
        return float(np.median(self.throughputs))

    @property
    def speedup(self) -> float:
        return float(np.median(self.speedups))


def _tile(feeds: Feeds, count: int) -> dict[str, Array]:
    """`count` samples from `feeds`, repeating them when it holds fewer, padding trimmed."""
    index = np.arange(count) % len(feeds)
    return feeds.take(index).batch(0, count)


def _chunks(feeds: Feeds, batch: int) -> list[dict[str, Array]]:
    """The batches a throughput loop cycles through: every full batch of `feeds` in order (padding trimmed per
    batch), or one tiled batch when `feeds` holds fewer than `batch` samples. At batch 1 the loop so runs every
    timed sample in turn, not the first one over and over."""
    if len(feeds) < batch:
        return [_tile(feeds, batch)]
    return [feeds.batch(start, start + batch) for start in range(0, len(feeds) - batch + 1, batch)]


def benchmark(
    runners: Mapping[str, Runner],
    feeds: Feeds,
    *,
    baseline: str,
    batch: int,
    rounds: int = 5,
    latency_runs: int = 8,
    min_batch_seconds: float = 0.2,
    on_round: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    failures: dict[str, str] | None = None,
) -> dict[str, Timing]:
    """Time every runner in interleaved rounds (see the module docstring).

    Within a round the baseline runs before the first variant and after every variant (B V1 B V2 B ...), and a
    variant's speedup in that round is its throughput over the mean of the two baseline runs around it: the
    ratio compares runs seconds apart, whatever else the machine was doing. With `failures`, a variant whose run
    fails is left out from then on (no timing: its rounds would be incomplete) and its error put there, by name.

    Raises:
        OptimizationError: `baseline` is not among the runners, a run fails (the baseline's, or any without
            `failures`), or there is nothing to time.
    """
    if baseline not in runners:
        raise OptimizationError(f"baseline {baseline!r} is not among the variants timed")
    if len(feeds) == 0 or rounds < 1:
        raise OptimizationError("benchmarking needs at least one sample and one round")
    chunks = _chunks(feeds, batch)
    singles = [feeds.batch(i, i + 1) for i in range(len(feeds))]
    names = sorted(runners)
    failed: dict[str, str] = {}

    def attempt(name: str, run: Callable[[], float]) -> float | None:
        """`run()` for `name`; None (its error kept) when a variant's fails and failures are collected."""
        try:
            return run()
        except StrataError as exc:
            if failures is None or name == baseline:
                raise
            failed[name] = str(exc)
            return None

    repeats: dict[str, int] = {}

    def warm_up(name: str) -> float:  # and size each variant's throughput loop to at least min_batch_seconds
        runners[name].run(singles[0])
        start = clock()
        runners[name].run(chunks[0])
        taken = max(clock() - start, 1e-6)
        repeats[name] = max(1, math.ceil(min_batch_seconds / taken))
        return taken

    for name in names:
        attempt(name, functools.partial(warm_up, name))
    latencies: dict[str, list[float]] = {n: [] for n in names}
    throughputs: dict[str, list[float]] = {n: [] for n in names}
    speedups: dict[str, list[float]] = {n: [] for n in names}

    def throughput(name: str) -> float:
        start = clock()
        for i in range(repeats[name]):
            runners[name].run(chunks[i % len(chunks)])
        return batch * repeats[name] / max(clock() - start, 1e-9)

    def latency(name: str, round_no: int) -> None:
        for i in range(latency_runs):
            one = singles[(round_no * latency_runs + i) % len(singles)]
            start = clock()
            runners[name].run(one)
            latencies[name].append((clock() - start) * 1000.0)

    def timed(name: str, round_no: int) -> float:
        got = throughput(name)
        latency(name, round_no)
        return got

    others = [n for n in names if n != baseline]
    for round_no in range(rounds):
        shift = round_no % max(len(others), 1)
        order = others[shift:] + others[:shift]
        before = throughput(baseline)
        throughputs[baseline].append(before)
        latency(baseline, round_no)
        for name in order:
            got = None if name in failed else attempt(name, functools.partial(timed, name, round_no))
            if got is None:
                if on_round is not None:  # its steps still counted, so a progress bar ends where it should
                    on_round(name)
                continue
            after = throughput(baseline)
            throughputs[name].append(got)
            throughputs[baseline].append(after)
            speedups[name].append(got / ((before + after) / 2.0))
            before = after
            if on_round is not None:
                on_round(name)
        speedups[baseline].append(1.0)
        if on_round is not None:
            on_round(baseline)
    if failures is not None:
        failures.update(failed)
    return {
        name: Timing(
            latencies_ms=tuple(latencies[name]),
            throughputs=tuple(throughputs[name]),
            speedups=tuple(speedups[name]),
        )
        for name in names
        if name not in failed
    }


def peak_memory(
    model: Path,
    runtime: str,
    feeds_npz: Path,
    threads: int | None,
    precision: str = "fp32",
    timeout: float = 300.0,
) -> int:
    """Peak resident memory (bytes) that loading `model` and running the feeds once adds to a fresh process.

    Measured in a child process (`python -m strata.optimize.memprobe`): the peak resident size after the run
    minus the resident size before the model was loaded.

    Raises:
        OptimizationError: the child fails or answers with something else than its JSON line.
    """
    argv = [sys.executable, "-m", "strata.optimize.memprobe", str(model), runtime, str(feeds_npz), str(threads or 0)]
    argv.append(precision)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OptimizationError(f"memory probe of {model.name} did not finish: {exc}") from exc
    if done.returncode != 0:
        raise OptimizationError(f"memory probe of {model.name} failed: {done.stderr.strip()[-500:]}")
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
        return int(answer["peak_bytes"]) - int(answer["before_bytes"])
    except (ValueError, KeyError, IndexError) as exc:
        raise OptimizationError(f"memory probe of {model.name} answered {done.stdout[-200:]!r}") from exc


def save_feeds(feeds: Mapping[str, Array], path: Path) -> Path:
    """Write feeds as an npz (for the memory probe)."""
    # numpy's stub lists `allow_pickle: bool` among savez's keywords, so a `**dict` of arrays cannot type-check
    np.savez(path, **dict(feeds))  # type: ignore[arg-type]
    return path


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50 and p95 of `values`."""
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}
