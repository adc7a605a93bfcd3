"""`strata optimize`'s result table at a fixed terminal width: whole words in every cell, columns left out instead."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from rich.console import Console

from strata.optimize.report import Report, VariantResult, report_table


def variant(vid: str, profile: str, runtime: str, gate: str = "passed", reason: str | None = None) -> VariantResult:
    return VariantResult(
        id=vid,
        path=None,
        profile=profile,
        runtime=runtime,
        precision="int8",
        passes=(),
        verified=True,
        accuracy={"top1_agreement": 0.9951, "accuracy": 0.97},
        latency_ms={"p50": 0.41, "p95": 0.93},
        throughput=12345.6,
        speedup=2.31,
        size_bytes=1_234_567,
        peak_memory_bytes=None,
        gate=gate,
        reason=reason,
        speedup_batch1=1.12,
    )


REPORT = Report(
    model={"name": "digits", "version": "1"},
    host_profile="x86_64-avx512-vnni",
    task="classification",
    gate="top1_agreement>=0.99",
    targets=("x86_64-avx512-vnni",),
    data={},
    benchmark={"batch": 32},
    variants=(
        variant("fp32", "cpu-generic", "onnxruntime"),
        variant("int8-dyn-fused-s8-pc-rr", "x86_64-avx512-vnni", "onnxruntime", "failed", "top1_agreement 0.91 < 0.99"),
        variant("ov-int8-nncf", "x86_64-avx512-vnni", "openvino"),
    ),
    selected={"x86_64-avx512-vnni": "ov-int8-nncf"},
    selection_notes={},
)


def shown(width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(report_table(REPORT, width))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [60, 80, 120, 220])
def test_no_cell_is_split_mid_word_at_any_width(width: int) -> None:
    """At 80 columns every cell was folded ("onnxruntim e", "x86_64-avx51 2-vnni")."""
    lines = shown(width)
    assert all(len(line) <= width for line in lines)
    rows = [line for line in lines if line.startswith("│") and line.split("│")[1].strip()]
    assert [row.split("│")[1].strip() for row in rows] == ["fp32", "int8-dyn-fused-s8-pc-rr", "ov-int8-nncf"]
    for row in rows:
        assert "onnxruntime" in row or "openvino" in row


def test_a_wide_terminal_shows_every_column_and_a_narrow_one_says_what_it_left_out() -> None:
    wide = "\n".join(shown(220))
    assert "left out" not in wide
    assert "x86_64-avx512-vnni" in wide
    assert "top1_agreement 0.91 < 0.99" in wide
    narrow = " ".join(" ".join(shown(80)).split())
    assert "left out for the terminal's width: speedup (batch 1), p50 ms" in narrow
    assert "top1_agreement 0.91 < 0.99" in narrow  # the reason stays longest


@pytest.mark.parametrize("width", [60, 80, 120, 160])
def test_a_table_with_no_reason_fits_the_terminal_with_its_right_border(width: int) -> None:
    """New-user trial: when no variant had a reason, the width estimate took the reason column as 0 columns wide,
    but it is drawn at least _REASON_MIN wide: at 120 and 160 columns the table was cut, right border and all."""
    passing = Report(
        **{**REPORT.__dict__, "variants": tuple(replace(v, gate="passed", reason=None) for v in REPORT.variants)}
    )
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(report_table(passing, width))
    lines = [line for line in console.export_text().splitlines() if line.strip()]
    table = [line for line in lines if line[0] in "┏┃┡│└"]
    assert table, "\n".join(lines)
    assert all(line.rstrip()[-1] in "┓┃┩│┘" for line in table), "\n".join(lines)
