"""Short-lived helper children: the agent keeps `cryptography` and tpm2-pytss out of its own process (its memory
budget) and runs the key, signing and TPM work as `python -OO -m strata.trust.<module>` instead."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from strata.core.errors import ConfigError


def run_module(module: str, args: Sequence[str], stdin: bytes = b"", *, timeout_s: float, what: str) -> bytes:
    """Run `python -OO -m MODULE ARGS` with `stdin`; what it wrote to stdout.

    Raises:
        ConfigError: it could not start, ran past `timeout_s`, or failed (its last line of stderr is kept).
    """
    try:
        done = subprocess.run(
            [sys.executable, "-OO", "-m", module, *args],
            input=stdin,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"{what} did not finish in {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise ConfigError(f"{what} could not start: {exc}") from exc
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise ConfigError(f"{what} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout
