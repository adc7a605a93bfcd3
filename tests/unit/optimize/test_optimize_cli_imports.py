"""The CLI, with `strata optimize` registered, still starts without onnxruntime, OpenVINO or NNCF."""

from __future__ import annotations

import subprocess
import sys


def test_cli_module_load_imports_no_runtime() -> None:
    code = (
        "import sys, strata.cli.app; "
        "print(sorted(m for m in ('onnxruntime', 'openvino', 'nncf', 'onnx', 'matplotlib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
