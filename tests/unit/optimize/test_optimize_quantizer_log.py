"""`quantizer_output_to_log`: the quantizer's chatter goes to the debug log; everything is put back, and errors
and strata's own logging are not swallowed."""

from __future__ import annotations

import logging
import sys

import pytest

from strata.optimize.pipeline import quantizer_output_to_log


def _a_failing_pass() -> None:
    print("Collecting tensor data and making histogram ...")
    logging.warning("Please consider to run pre-processing before quantization.")
    logging.error("Quantization failed: axis 3 is out of range")  # a library's error on the root logger
    logging.getLogger("strata.optimize.passes").warning("strata's own warning")
    raise RuntimeError("the pass failed")


def test_a_failing_pass_puts_stdout_and_the_root_logger_back_and_its_errors_still_show(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    root = logging.getLogger()
    before = (sys.stdout, list(root.filters), list(root.handlers))
    with pytest.raises(RuntimeError, match="the pass failed"), quantizer_output_to_log():
        _a_failing_pass()
    assert (sys.stdout, root.filters, root.handlers) == before
    shown = [
        (name, level, message) for name, level, message in caplog.record_tuples if name != "strata.optimize.pipeline"
    ]
    # the error was demoted to a debug line with the quantizer's chatter: a failing pass gave no reason on screen
    assert shown == [
        ("root", logging.ERROR, "Quantization failed: axis 3 is out of range"),
        ("strata.optimize.passes", logging.WARNING, "strata's own warning"),
    ]
    logged = [m for name, _, m in caplog.record_tuples if name == "strata.optimize.pipeline"]
    assert logged == [
        "quantizer: Please consider to run pre-processing before quantization.",
        "quantizer: Collecting tensor data and making histogram ...",
    ]
