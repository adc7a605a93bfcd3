"""MiniLM on this host (the one slow optimize test): the naive int8 variant is rejected for its accuracy and
an int8 variant that keeps the cosine similarity is selected because it is faster. The full search and the
1.3x figure are in bench/optimize_minilm.py; this test searches only the QInt8 half of the dynamic grid."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.optimize.corpus import python_doc_sentences, write_sentences
from strata.optimize.passes import DynamicQuantizationPass
from strata.optimize.pipeline import OptimizeRequest, run_optimize


@pytest.mark.slow
def test_minilm_selects_an_accurate_int8_variant_and_rejects_the_naive_one(minilm_dir: Path, tmp_path: Path) -> None:
    sentences = python_doc_sentences()
    request = OptimizeRequest(
        model=minilm_dir / "model.onnx",
        name="minilm",
        version="1",
        task="embedding",
        calibration=write_sentences(tmp_path / "calibration.txt", sentences[0::2][:32]),
        evaluation=write_sentences(tmp_path / "evaluation.txt", sentences[1::2][:80]),
        tokenizer=minilm_dir / "tokenizer.json",
        out=tmp_path / "out",
        rounds=3,
        measure_memory=False,
    )
    report = run_optimize(request, [DynamicQuantizationPass(weight_types=("QInt8",))])

    naive = report.variant("int8-dyn-s8")
    assert naive.gate == "failed"
    assert naive.reason is not None
    assert "mean_cosine" in naive.reason
    assert naive.accuracy["mean_cosine"] < 0.99

    chosen = report.variant(report.selected[report.host_profile])
    assert chosen.precision == "int8"
    assert chosen.gate == "passed"
    assert chosen.accuracy["mean_cosine"] >= 0.99
    assert chosen.accuracy["min_cosine"] >= 0.97
    assert chosen.speedup is not None
    assert chosen.speedup >= 1.2, f"{chosen.id} is only {chosen.speedup:.2f}x fp32"
    assert (tmp_path / "out" / str(chosen.path) / "manifest.json").is_file()
