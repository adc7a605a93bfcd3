"""Judging and selection are pure: made-up measurements in, verdicts and choices out."""

from __future__ import annotations

from strata.core.profiles import catalog, get_profile
from strata.optimize.gate import parse_gate
from strata.optimize.select import Measured, as_verdict, judge, select_variants

AVX2 = get_profile("x86_64-avx2")
GENERIC = get_profile("cpu-generic")
ARM = get_profile("arm64-neon")
CUDA = get_profile("x86_64-cuda")
OPENVINO = get_profile("intel-openvino")


def v(
    vid: str, speedup: float | None, gate: str = "passed", profile: str = "cpu-generic", runtime: str = "onnxruntime",
    precision: str = "int8",
) -> Measured:  # fmt: skip
    return Measured(vid, profile, runtime, precision, as_verdict(gate), speedup)


def test_fastest_passing_variant_wins_and_failed_ones_never_do() -> None:
    variants = [
        v("fp32", 1.0, precision="fp32"),
        v("int8-naive", 1.45, gate="failed"),
        v("int8-pc-rr", 1.38),
        v("int8-u8", 1.2),
    ]
    selection = select_variants([AVX2, GENERIC], variants, catalog())
    assert selection.chosen == {"x86_64-avx2": "int8-pc-rr", "cpu-generic": "int8-pc-rr"}
    assert "1.38x" in selection.why["x86_64-avx2"]


def test_isa_bound_variant_goes_only_to_profiles_with_that_isa() -> None:
    variants = [v("fp32", 1.0, precision="fp32"), v("fp32-ort-all", 1.2, profile="x86_64-avx2", precision="fp32")]
    selection = select_variants([AVX2, GENERIC, ARM], variants, catalog())
    assert selection.chosen == {"x86_64-avx2": "fp32-ort-all", "cpu-generic": "fp32", "arm64-neon": "fp32"}


def test_runtime_and_precision_must_fit_the_target() -> None:
    variants = [
        v("fp32", 1.0, precision="fp32"),
        v("ov-int8", 3.0, profile="intel-openvino", runtime="openvino"),
        v("fp16-cuda", 5.0, profile="x86_64-cuda", runtime="onnxruntime-cuda", precision="fp16"),
    ]
    selection = select_variants([AVX2, OPENVINO, CUDA], variants, catalog())
    assert selection.chosen == {"x86_64-avx2": "fp32", "intel-openvino": "ov-int8", "x86_64-cuda": "fp16-cuda"}


def test_unverified_never_wins_over_a_verified_passing_variant() -> None:
    variants = [
        v("fp32", 1.0, precision="fp32"),
        v("fp16-x86_64-cuda", None, gate="unverified", profile="x86_64-cuda", runtime="onnxruntime-cuda",
          precision="fp16"),
    ]  # fmt: skip
    assert select_variants([CUDA], variants, catalog()).chosen == {"x86_64-cuda": "fp32"}


def test_unverified_is_chosen_only_when_nothing_verified_passes() -> None:
    variants = [
        v("fp32", 1.0, gate="failed", precision="fp32"),
        v("fp16-other", None, gate="unverified", profile="jetson-cuda", runtime="onnxruntime-cuda", precision="fp16"),
        v("fp16-x86_64-cuda", None, gate="unverified", profile="x86_64-cuda", runtime="onnxruntime-cuda",
          precision="fp16"),
    ]  # fmt: skip
    selection = select_variants([CUDA, AVX2], variants, catalog())
    assert selection.chosen == {"x86_64-cuda": "fp16-x86_64-cuda"}
    assert "unverified" in selection.why["x86_64-cuda"]
    assert "x86_64-avx2" not in selection.chosen
    assert "passed the gate" in selection.why["x86_64-avx2"]


def test_ties_break_by_id_so_the_choice_is_stable() -> None:
    variants = [v("b", 1.3), v("a", 1.3), v("c", 1.3)]
    assert select_variants([GENERIC], variants, catalog()).chosen == {"cpu-generic": "a"}
    assert select_variants([GENERIC], list(reversed(variants)), catalog()).chosen == {"cpu-generic": "a"}


def test_unknown_variant_profile_is_not_runnable() -> None:
    assert select_variants([GENERIC], [v("x", 2.0, profile="no-such")], catalog()).chosen == {}


def test_judge_explains_each_verdict() -> None:
    gate = parse_gate("mean_cosine>=0.99,min_cosine>=0.97")
    good = {"mean_cosine": 0.991, "min_cosine": 0.983}
    naive = {"mean_cosine": 0.960, "min_cosine": 0.886}
    assert judge(good, gate, verified=True).gate == "passed"
    failed = judge(naive, gate, verified=True)
    assert failed.gate == "failed"
    assert failed.reason == "mean_cosine 0.96 < 0.99; min_cosine 0.886 < 0.97"
    assert judge({}, gate, verified=False).gate == "unverified"
    broken = judge({}, gate, verified=False, error="quantize_dynamic failed: boom")
    assert (broken.gate, broken.reason) == ("failed", "not built: quantize_dynamic failed: boom")
