"""The pipeline end to end on real small models: the digits classifier gets verified static int8 variants, the
report and packages are what the issue promises, and bad inputs are clear errors before anything is built."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from strata.core.errors import ConfigError
from strata.core.package import verify_package
from strata.examples.digits import load_data
from strata.optimize.passes import FusedDynamicQuantizationPass, GraphOptimizationPass, StaticQuantizationPass
from strata.optimize.pipeline import OptimizeRequest, run_optimize
from strata.optimize.report import PLOT_NAME, read_report


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Calibration rows from the training split, evaluation rows (with labels) from the held-out split."""
    folder = tmp_path_factory.mktemp("digits-data")
    data = load_data()
    np.savez(folder / "calibration.npz", X=data.train_x[:128])
    np.savez(folder / "evaluation.npz", X=data.test_x, labels=data.test_y)
    return folder / "calibration.npz", folder / "evaluation.npz"


def request(model: Path, data: tuple[Path, Path], out: Path, **changes: object) -> OptimizeRequest:
    fields: dict[str, object] = {
        "model": model,
        "name": "digits",
        "version": "1",
        "task": "classification",
        "calibration": data[0],
        "evaluation": data[1],
        "out": out,
        "targets": ("x86_64-avx2", "cpu-generic"),
        "rounds": 1,
        "measure_memory": False,
    }
    fields.update(changes)
    return OptimizeRequest(**fields)


def test_digits_gets_static_int8_variants_that_pass_the_gate(
    digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = run_optimize(request(digits_onnx, digits_data, out, measure_memory=True), [StaticQuantizationPass()])
    static = [v for v in report.variants if v.id.startswith("int8-qdq-")]
    assert [v.id for v in static] == ["int8-qdq-minmax", "int8-qdq-entropy", "int8-qdq-percentile"]
    for variant in static:
        assert variant.verified
        assert variant.accuracy["top1_agreement"] >= 0.99, variant
        assert variant.gate == "passed"
        assert variant.accuracy["accuracy"] > 0.9
        assert variant.peak_memory_bytes is not None
        assert variant.peak_memory_bytes > 0
    assert set(report.selected) == {"x86_64-avx2", "cpu-generic"}

    on_disk = json.loads((out / "report.json").read_text())
    assert {"model", "host_profile", "variants", "selected"} <= on_disk.keys()
    for entry in on_disk["variants"]:
        assert {"id", "path", "profile", "runtime", "precision", "passes", "verified", "accuracy", "latency_ms",
                "throughput", "size_bytes", "gate", "reason"} <= entry.keys()  # fmt: skip
        assert set(entry["latency_ms"]) == {"p50", "p95"}
        assert entry["speedup_batch1"] > 0  # timed at batch 1 too, against fp32 at batch 1
        assert entry["throughput_batch1"] < entry["throughput"]
        assert not Path(entry["path"]).is_absolute()
        package = verify_package(out / entry["path"])
        assert package.manifest.metrics["top1_agreement"] == pytest.approx(entry["accuracy"]["top1_agreement"])
        assert package.manifest.metrics["gate"] == "passed"
    assert on_disk["benchmark"]["batches"] == [1, on_disk["benchmark"]["batch"]]
    assert on_disk["benchmark"]["selection_key"] == f"speedup at batch {on_disk['benchmark']['batch']}"
    assert on_disk["data"]["method"].startswith("disjoint")
    assert on_disk["data"]["calibration_samples"] == 128
    assert on_disk["data"]["evaluation_samples"] + on_disk["data"]["benchmark_samples"] == len(load_data().test_x)
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_report(out) == report


def test_a_gate_nothing_meets_rejects_everything_with_reasons(
    digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = run_optimize(
        request(digits_onnx, digits_data, out, gate="top1_agreement>=0.99,speedup>=50"),
        [GraphOptimizationPass(levels=("basic",)), FusedDynamicQuantizationPass()],
    )
    assert "recognised no transformer block" in report.skipped_passes["dynamic-fused"]  # a CNN: nothing fused
    assert report.selected == {}
    assert all(v.gate == "failed" and v.reason and "speedup" in v.reason for v in report.variants)
    assert all(v.path is None for v in report.variants)
    assert "passed the gate" in report.selection_notes["cpu-generic"]


def test_ranked_by_batch1_the_fastest_passing_variant_at_batch1_is_selected(
    digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    report = run_optimize(
        request(digits_onnx, digits_data, tmp_path / "out", rank_by="batch1", targets=("cpu-generic",)),
        [GraphOptimizationPass(levels=("basic", "extended"))],
    )
    assert report.benchmark["selection_key"] == "speedup at batch 1"
    passing = [v for v in report.variants if v.gate == "passed" and v.profile == "cpu-generic"]
    assert report.selected["cpu-generic"] == min(passing, key=lambda v: (-(v.speedup_batch1 or 0.0), v.id)).id


def test_one_file_given_twice_is_split_not_reused(
    digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = run_optimize(
        request(digits_onnx, (digits_data[1], digits_data[1]), out), [GraphOptimizationPass(levels=("basic",))]
    )
    assert report.data["method"].startswith("split")
    total = report.data["calibration_samples"] + report.data["evaluation_samples"] + report.data["benchmark_samples"]
    assert total == len(load_data().test_x)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not-onnx", "not an ONNX model"),
        ("wrong-names", r"missing \['X'\]"),
        ("wrong-shape", r"has shape \[8, 10\]"),
        ("empty-eval", "holds no samples"),
        ("overlap", "appear in both"),
        ("out-not-empty", "not empty"),
        ("unknown-target", "unknown hardware profile"),
        ("bad-gate", "unknown metric"),
        ("bad-rank-by", "--rank-by is one of batch, batch1, not 'batch32'"),
    ],
)
def test_bad_inputs_are_clear_errors(
    case: str, message: str, digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data, changes = digits_onnx, digits_data, {}
    if case == "not-onnx":
        model = tmp_path / "model.onnx"
        model.write_bytes(b"this is not a protobuf")
    elif case == "wrong-names":
        np.savez(tmp_path / "c.npz", pixels=np.zeros((8, 64), np.float32))
        data = (tmp_path / "c.npz", digits_data[1])
    elif case == "wrong-shape":
        np.savez(tmp_path / "c.npz", X=np.zeros((8, 10), np.float32))
        data = (tmp_path / "c.npz", digits_data[1])
    elif case == "empty-eval":
        np.savez(tmp_path / "e.npz", X=np.zeros((0, 64), np.float32))
        data = (digits_data[0], tmp_path / "e.npz")
    elif case == "overlap":
        np.savez(tmp_path / "e.npz", X=load_data().train_x[100:140])
        data = (digits_data[0], tmp_path / "e.npz")
    elif case == "out-not-empty":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "unknown-target":
        changes = {"targets": ("quantum-9000",)}
    elif case == "bad-gate":
        changes = {"gate": "accuracy_top1>=0.99"}
    elif case == "bad-rank-by":
        changes = {"rank_by": "batch32"}
    with pytest.raises(ConfigError, match=message):
        run_optimize(request(model, data, tmp_path / "out", **changes), [GraphOptimizationPass()])
    if case != "out-not-empty":
        assert not (tmp_path / "out").exists()


def test_cli_runs_and_fails_with_exit_code_2_on_bad_input(
    digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    common = ["--name", "digits", "--version", "1", "--task", "classification", "--calibration", str(digits_data[0])]
    argv = [sys.executable, "-m", "strata", "optimize", str(digits_onnx), *common, "--eval", str(digits_data[1])]
    argv += ["--pass", "graph", "--rounds", "1", "--target", "cpu-generic", "--json"]
    done = subprocess.run([*argv, "--out", str(tmp_path / "ok")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["report"]["selected"]["cpu-generic"] in {v["id"] for v in answer["report"]["variants"]}
    assert answer["pushed"] == []
    assert "benchmark" in done.stderr  # the progress bars
    bad = subprocess.run(
        [*argv, "--out", str(tmp_path / "bad"), "--gate", "mean_cosine>=0.99;rm -rf /"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert "error:" in bad.stderr
    assert "not METRIC OP NUMBER" in bad.stderr


WITHOUT_OPTIONAL = """
import sys
sys.modules["matplotlib"] = None  # as in an environment with strata[demo] and not strata[optimize]
sys.modules["openvino"] = None
from strata.cli.app import main
sys.argv = ["strata", *sys.argv[1:]]
main()
"""


def test_what_an_environment_without_the_optimize_extra_lacks_is_said_as_typed(
    digits_onnx: Path, digits_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """The reasons are plain text, not Rich markup (`[optimize]` was read as a style and vanished), and a run
    that could draw no plot says so and why instead of naming a file it never wrote."""
    argv = [sys.executable, "-c", WITHOUT_OPTIONAL, "optimize", str(digits_onnx), "--name", "digits", "--version", "1"]
    argv += ["--task", "classification", "--calibration", str(digits_data[0]), "--eval", str(digits_data[1])]
    argv += ["--pass", "graph", "--pass", "openvino", "--rounds", "1", "--target", "x86_64-avx2"]
    done = subprocess.run([*argv, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())  # Rich wraps long lines at the width it is given
    assert "pass openvino skipped: openvino is not installed (pip install 'strata[optimize]')" in said
    assert "plot: none (matplotlib is not installed: pip install 'strata[optimize]')" in said
    assert not (tmp_path / "out" / PLOT_NAME).exists()


def test_a_cuda_variant_is_never_timed_on_the_cpu(tiny_mlp: Path, tmp_path: Path) -> None:
    """Told that CUDA is here when onnxruntime has no CUDA provider (as onnxruntime-gpu is where CUDA cannot load),
    the runner gets a CPU session for the fp16 CUDA variant: it refuses to measure it, and the variant fails
    with that reason instead of being verified and timed on the CPU."""
    from strata.optimize.passes import Float16Pass

    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calibration.npz", X=rng.standard_normal((32, 16)).astype(np.float32))
    np.savez(tmp_path / "evaluation.npz", X=rng.standard_normal((64, 16)).astype(np.float32))
    data = (tmp_path / "calibration.npz", tmp_path / "evaluation.npz")
    report = run_optimize(
        request(tiny_mlp, data, tmp_path / "out", targets=("x86_64-cuda", "cpu-generic"), name="mlp"),
        [Float16Pass()],
        runtimes=frozenset({"onnxruntime", "onnxruntime-cuda"}),
    )
    variants = {v.id: v for v in report.variants}
    cuda = variants["fp16-x86_64-cuda"]
    assert (cuda.gate, cuda.verified, cuda.throughput, cuda.accuracy) == ("failed", False, None, {})
    assert cuda.reason is not None
    assert "needs CUDAExecutionProvider" in cuda.reason
    assert "CPUExecutionProvider" in cuda.reason
    assert variants["fp32"].verified


def _regressor(path: Path, nodes: list[Any], output: list[int | str | None], weights: bool = False) -> Path:
    """X [batch, 4] -> `nodes` -> Y, declared `output`; W [4, 3] among the initializers when `weights`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        nodes,
        "regressor",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, output)],
        [numpy_helper.from_array(w, "W")] if weights else [],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _scalar(path: Path) -> Path:
    """Declared [N, 1], returns one number for the whole batch."""
    from onnx import helper

    return _regressor(path, [helper.make_node("ReduceSum", ["X"], ["Y"], keepdims=0)], ["batch", 1])


def _transposed(path: Path) -> Path:
    """[3, N]: the samples on the second axis."""
    from onnx import helper

    nodes = [helper.make_node("MatMul", ["X", "W"], ["S"]), helper.make_node("Transpose", ["S"], ["Y"], perm=[1, 0])]
    return _regressor(path, nodes, [3, "batch"], weights=True)


def _rows(tmp_path: Path) -> tuple[Path, Path]:
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(1).standard_normal((300, 4)).astype(np.float32))
    return tmp_path / "data.npz", tmp_path / "data.npz"


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (_scalar, r"output Y has shape \[\] for 64 samples: the optimizer needs the samples on the first axis"),
        (_transposed, r"output Y has shape \[3, 64\] for 64 samples: the optimizer needs the samples on the first"),
    ],
    ids=["scalar", "transposed"],
)
def test_a_model_whose_output_is_not_one_row_per_sample_is_bad_input(
    make: Callable[[Path], Path], said: str, tmp_path: Path
) -> None:
    """It was a TypeError (len() of a scalar) or numpy's ValueError (concatenating [3, 64] and [3, 48]), and an
    empty output folder left behind."""
    model = make(tmp_path / "model.onnx")
    with pytest.raises(ConfigError, match=said):
        run_optimize(request(model, _rows(tmp_path), tmp_path / "out", task="regression"), [GraphOptimizationPass()])
    assert not (tmp_path / "out").exists()


def test_a_variant_whose_output_is_not_one_row_per_sample_fails_alone(tmp_path: Path) -> None:
    from onnx import helper

    from strata.optimize.base import Candidate
    from strata.optimize.data import Feeds
    from strata.optimize.pipeline import SilentProgress, measure_candidates
    from strata.optimize.runners import OrtRunner
    from strata.optimize.tasks import get_task

    good = _regressor(tmp_path / "good.onnx", [helper.make_node("MatMul", ["X", "W"], ["Y"])], ["batch", 3], True)
    rows = Feeds({"X": np.random.default_rng(1).standard_normal((100, 4)).astype(np.float32)})
    candidates = [
        Candidate("fp32", good, "cpu-generic", "onnxruntime", "fp32", ("original",)),
        Candidate("scalar", _scalar(tmp_path / "scalar.onnx"), "cpu-generic", "onnxruntime", "fp32", ("test",)),
        Candidate("transposed", _transposed(tmp_path / "t.onnx"), "cpu-generic", "onnxruntime", "fp32", ("test",)),
    ]
    measured = measure_candidates(
        candidates,
        reference=OrtRunner(good),
        task=get_task("regression"),
        output="Y",
        evaluation=rows,
        bench=rows,
        batch=64,
        request=request(good, _rows(tmp_path), tmp_path / "out", task="regression"),
        runtimes=frozenset({"onnxruntime"}),
        workdir=tmp_path,
        progress=SilentProgress(),
    )
    assert measured["fp32"].error is None
    assert measured["fp32"].timing is not None
    assert measured["scalar"].error == (
        "does not run here: output Y has shape [] for 64 samples: the optimizer needs the samples on the first axis"
    )
    assert measured["transposed"].error is not None
    assert "output Y has shape [3, 64] for 64 samples" in measured["transposed"].error
    assert measured["transposed"].timing is None


class _Interrupted:
    """Progress that stops the run where the first pass is done, as Ctrl-C would."""

    def phase(self, name: str, total: int) -> None:
        return None

    def step(self, detail: str) -> None:
        raise KeyboardInterrupt


def test_a_failed_run_removes_the_output_folder_it_made_and_only_that(tiny_mlp: Path, tmp_path: Path) -> None:
    """Not only on bad input: a failure after the build started (here an interrupt) left an --out folder that the
    next run refused as not empty. A folder that was there before stays."""
    np.savez(tmp_path / "data.npz", X=np.random.default_rng(3).standard_normal((96, 16)).astype(np.float32))
    data = (tmp_path / "data.npz", tmp_path / "data.npz")
    made = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt):
        run_optimize(request(tiny_mlp, data, made, name="mlp"), [GraphOptimizationPass()], progress=_Interrupted())
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run_optimize(
            request(tiny_mlp, data, tmp_path / "mine", name="mlp"), [GraphOptimizationPass()], progress=_Interrupted()
        )
    assert (tmp_path / "mine").is_dir()
    assert not any((tmp_path / "mine").iterdir())
