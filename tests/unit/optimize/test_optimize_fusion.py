"""What counts as a recognised transformer in the fusion optimizer's statistics: pure, made-up counts in."""

from __future__ import annotations

from strata.optimize.passes.fusion import fusion_summary


def test_a_graph_is_a_transformer_only_when_a_transformer_block_fused() -> None:
    recognised, note = fusion_summary({"Attention": 6, "SkipLayerNormalization": 12, "BiasGelu": 6, "Gelu": 0})
    assert recognised
    assert note == "transformer fusion: Attention x6, BiasGelu x6, SkipLayerNormalization x12"

    recognised, note = fusion_summary({"Attention": 0, "SkipLayerNormalization": 12, "BiasGelu": 6})
    assert recognised
    assert "attention not fused" in note  # MiniLM as transformers exports it with SDPA

    assert fusion_summary({"BiasGelu": 1, "LayerNormalization": 1}) == (
        False,
        "transformer fusion: BiasGelu x1, LayerNormalization x1",
    )
    assert fusion_summary({"Attention": 0}) == (False, "transformer fusion: nothing")
