"""Import OpenVINO (and NNCF) without their usage telemetry.

OpenVINO and NNCF send usage data to Google Analytics by default, and a plain `import openvino` already does.
Both fall back to a built-in no-op when `openvino_telemetry` cannot be imported, so strata makes it
unimportable before importing them. Every strata import of OpenVINO goes through here.

NNCF logs through a handler of its own that prints to stdout (the stdout it found when imported): among
`strata optimize`'s progress bars, or into the report it writes there. Imported here, its records go to strata's
log instead (`NncfToLog`): below ERROR at debug level, errors as errors.

It also holds the settings every strata compile of an OpenVINO model uses (`compile_config`): OpenVINO's CPU
plugin picks its own inference precision (bf16 on a CPU with AVX512_BF16 or AMX), so a variant labelled fp32
would compute in bf16 on some nodes unless the precision is asked for.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Any, Final

from strata.core.errors import ConfigError

log = logging.getLogger(__name__)


def block_telemetry() -> None:
    """Make `import openvino_telemetry` raise ImportError (a None in sys.modules does that)."""
    if "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # typeshed allows only modules here


def import_openvino() -> ModuleType:
    """The `openvino` module, with its telemetry kept from loading.

    Raises:
        ConfigError: OpenVINO is not installed.
    """
    block_telemetry()
    try:
        import openvino
    except ImportError as exc:
        raise ConfigError("OpenVINO is not installed: pip install openvino (or 'strata[optimize]')") from exc
    module: ModuleType = openvino
    return module


def import_nncf() -> ModuleType:
    """The `nncf` module, with its telemetry kept from loading.

    Raises:
        ConfigError: NNCF is not installed.
    """
    import_openvino()
    try:
        import nncf
    except ImportError as exc:
        raise ConfigError("NNCF is not installed: pip install 'strata[optimize]'") from exc
    nncf_log = logging.getLogger("nncf")  # nncf's own logger class: it exists now, made by the import
    if not any(isinstance(handler, NncfToLog) for handler in nncf_log.handlers):
        for handler in list(nncf_log.handlers):
            if type(handler) is logging.StreamHandler:  # its stdout handler; a log file asked of it stays
                nncf_log.removeHandler(handler)
        nncf_log.addHandler(NncfToLog())
    module: ModuleType = nncf
    return module


class NncfToLog(logging.Handler):
    """Passes what NNCF logs (its `nncf` logger, which does not propagate) to strata's log: below ERROR at debug
    level, as onnxruntime's quantizer chatter is (`strata.optimize.pipeline`); an error stays an error, which
    reaches the terminal (it may say why a quantization failed)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            log.log(record.levelno, "nncf: %s", record.getMessage(), exc_info=record.exc_info)
        else:
            log.debug("nncf: %s", record.getMessage())


# The inference precision each strata precision runs OpenVINO in. An int8 IR holds FakeQuantize nodes: those
# parts run in int8, and what is left unquantized runs in f32, as in the fp32 variant the gate compared it with.
# A bf16 variant is the f32 IR compiled to compute in bf16 (AVX512_BF16 or AMX); on a CPU without bf16
# OpenVINO answers f32, and `check_inference_precision` refuses it.
INFERENCE_PRECISION: Final[dict[str, str]] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def inference_precision(precision: str) -> str:
    """OpenVINO's inference precision (`INFERENCE_PRECISION_HINT`) for a variant of this strata precision.

    Raises:
        ConfigError: strata has no OpenVINO variant of this precision (OpenVINO's CPU plugin would not run an
            fp16 one in f16 on most x86 CPUs: it answers bf16 or f32 whatever was asked).
    """
    try:
        return INFERENCE_PRECISION[precision]
    except KeyError:
        raise ConfigError(
            f"no OpenVINO inference precision for a {precision!r} variant; known: {sorted(INFERENCE_PRECISION)}"
        ) from None


def compile_config(precision: str, threads: int | None = None) -> dict[str, Any]:
    """The properties strata compiles an OpenVINO model for the CPU with: the variant's inference precision
    and, when given, the thread count.

    Raises:
        ConfigError: strata has no OpenVINO variant of this precision.
    """
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision(precision)}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def check_inference_precision(compiled: Any, precision: str) -> None:
    """Check that a compiled model really runs in the inference precision a variant of `precision` needs.

    OpenVINO may substitute another precision for one the CPU lacks without a word (f16 becomes bf16 on an
    AVX-512 BF16 CPU); a variant whose label is not what it computes must not load.

    Raises:
        ConfigError: the compiled model runs in another precision.
    """
    wanted = inference_precision(precision)
    got = compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino.Type: f32, bf16, f16
    got = got.to_string() if hasattr(got, "to_string") else str(got)
    if got != wanted:
        raise ConfigError(f"OpenVINO compiled a {precision} variant to run in {got}, not {wanted}")
