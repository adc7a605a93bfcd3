"""Child process of `strata.optimize.measure.peak_memory`: load one model, run it once, print memory as JSON.

Usage: python -m strata.optimize.memprobe MODEL RUNTIME FEEDS.npz THREADS PRECISION
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes. VmHWM (the peak) belongs to this process image alone;
    getrusage's ru_maxrss would carry over the peak of the parent that forked it."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv: list[str]) -> int:
    import numpy as np
    import onnxruntime  # noqa: F401  (imported before the baseline is taken, like the runtime's own libraries)

    from strata.core.openvino_import import import_openvino
    from strata.optimize.runners import open_runner

    model, runtime, feeds_path, threads, precision = Path(argv[0]), argv[1], Path(argv[2]), int(argv[3]), argv[4]
    if runtime == "openvino":
        import_openvino()
    with np.load(feeds_path, allow_pickle=False) as data:
        feeds = {key: data[key] for key in data.files}
    before = _status_bytes("VmRSS")
    runner = open_runner(model, runtime, threads or None, precision)
    runner.run(feeds)
    peak = _status_bytes("VmHWM")
    sys.stdout.write(json.dumps({"before_bytes": before, "peak_bytes": peak}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
