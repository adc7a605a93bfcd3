"""Import OpenVINO (and NNCF) without their usage telemetry.

OpenVINO and NNCF send usage data to Google Analytics by default, and a plain `import openvino` already does.
Both fall back to a built-in no-op when `openvino_telemetry` cannot be imported, so strata makes it
unimportable before importing them. Every strata import of OpenVINO goes through here.
"""

from __future__ import annotations

import sys
from types import ModuleType

from strata.core.errors import ConfigError


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
    module: ModuleType = nncf
    return module
