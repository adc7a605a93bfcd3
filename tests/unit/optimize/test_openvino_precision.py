"""Which inference precision strata asks OpenVINO for, per variant precision (pure logic; the compiled model's
own answer is read back in tests/integration/test_openvino_runtime.py)."""

from __future__ import annotations

from typing import Any

import pytest

from strata.core.errors import ConfigError
from strata.core.openvino_import import check_inference_precision, compile_config, inference_precision


class _Compiled:
    """Stands in for an OpenVINO CompiledModel: answers INFERENCE_PRECISION_HINT as OpenVINO's Type does."""

    def __init__(self, answer: str) -> None:
        self._answer = answer

    def get_property(self, name: str) -> Any:
        assert name == "INFERENCE_PRECISION_HINT"
        answer = self._answer
        return type("Type", (), {"to_string": lambda _self: answer})()


def test_fp32_and_int8_variants_compute_in_f32_with_the_threads_asked_for() -> None:
    assert inference_precision("fp32") == inference_precision("int8") == "f32"
    assert compile_config("fp32") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert compile_config("int8", 2) == {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}


def test_a_bf16_variant_computes_in_bf16() -> None:
    assert compile_config("bf16", 1) == {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": 1}
    check_inference_precision(_Compiled("bf16"), "bf16")
    with pytest.raises(ConfigError, match="to run in f32, not bf16"):  # a CPU without bf16
        check_inference_precision(_Compiled("f32"), "bf16")


def test_a_precision_without_an_exact_openvino_counterpart_is_refused() -> None:
    with pytest.raises(ConfigError, match="no OpenVINO inference precision for a 'fp16' variant"):
        compile_config("fp16")


def test_a_compiled_model_running_another_precision_than_asked_is_refused() -> None:
    check_inference_precision(_Compiled("f32"), "fp32")
    with pytest.raises(ConfigError, match="to run in bf16, not f32"):
        check_inference_precision(_Compiled("bf16"), "fp32")
