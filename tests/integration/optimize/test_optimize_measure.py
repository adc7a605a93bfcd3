"""Interleaved timing on real onnxruntime sessions: every variant timed every round, the baseline around each."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.core.errors import OptimizationError
from strata.optimize.base import PassContext
from strata.optimize.data import Feeds
from strata.optimize.measure import benchmark, peak_memory, save_feeds
from strata.optimize.passes import DynamicQuantizationPass
from strata.optimize.runners import open_runner


def test_benchmark_times_each_variant_every_round_against_the_baseline_around_it(
    tiny_mlp: Path, tmp_path: Path, context: PassContext, tiny_feeds: Feeds
) -> None:
    [int8] = DynamicQuantizationPass(("QUInt8",), (False,), (True,)).apply(tiny_mlp, tmp_path, context)
    runners = {"fp32": open_runner(tiny_mlp, "onnxruntime", 1), int8.id: open_runner(int8.model_path, "onnxruntime", 1)}
    steps: list[str] = []
    timings = benchmark(
        runners, tiny_feeds, baseline="fp32", batch=16, rounds=3, latency_runs=4, min_batch_seconds=0.01,
        on_round=steps.append,
    )  # fmt: skip
    assert steps == [int8.id, "fp32"] * 3
    base, variant = timings["fp32"], timings[int8.id]
    assert base.speedups == (1.0, 1.0, 1.0)
    assert len(base.throughputs) == 6  # before the variant and after it, each round
    assert len(variant.throughputs) == len(variant.speedups) == 3
    assert len(variant.latencies_ms) == 12
    assert all(s > 0 for s in variant.speedups)
    assert 0 < variant.p50_ms <= variant.p95_ms
    with pytest.raises(OptimizationError, match="baseline"):
        benchmark(runners, tiny_feeds, baseline="nope", batch=4)
    with pytest.raises(OptimizationError, match="at least one"):
        benchmark(runners, tiny_feeds, baseline="fp32", batch=4, rounds=0)


def test_a_variant_that_fails_while_timed_fails_alone(tiny_mlp: Path, tmp_path: Path, tiny_feeds: Feeds) -> None:
    """A variant that evaluated (sample by sample) but cannot take the timed batch: it stopped the whole run (a
    run of twenty variants lost to one); now it is left out with its reason, the others timed as before."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["scores"])],
        "one-at-a-time",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 16])],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "single.onnx")
    runners = {
        "fp32": open_runner(tiny_mlp, "onnxruntime", 1),
        "single": open_runner(tmp_path / "single.onnx", "onnxruntime", 1),
    }
    failures: dict[str, str] = {}
    steps: list[str] = []
    timings = benchmark(
        runners, tiny_feeds, baseline="fp32", batch=16, rounds=2, latency_runs=2, min_batch_seconds=0.01,
        on_round=steps.append, failures=failures,
    )  # fmt: skip
    assert set(timings) == {"fp32"}
    assert list(failures) == ["single"]
    assert "X" in failures["single"]  # onnxruntime's reason: the input's dimensions
    assert steps == ["single", "fp32"] * 2  # every step still counted for the progress bar
    with pytest.raises(OptimizationError):  # without `failures`, as before: the run's error
        benchmark(runners, tiny_feeds, baseline="fp32", batch=16, rounds=1, min_batch_seconds=0.01)


def test_peak_memory_is_measured_in_a_fresh_child(tiny_mlp: Path, tmp_path: Path, tiny_feeds: Feeds) -> None:
    feeds = save_feeds(tiny_feeds.batch(0, 8), tmp_path / "feeds.npz")
    used = peak_memory(tiny_mlp, "onnxruntime", feeds, 1)
    assert 0 < used < 200 << 20  # a few MB for a 2 kB model, not the parent's footprint
    with pytest.raises(OptimizationError, match="memory probe"):
        peak_memory(tmp_path / "missing.onnx", "onnxruntime", feeds, 1)
