"""A server process's connection caps under its open files limit (the control plane's, the agent's listeners'), and
raising that limit at start."""

from __future__ import annotations

import resource
import subprocess
import sys

from strata.core.openfiles import FD_RESERVE, effective_max_connections


def test_the_cap_keeps_descriptors_for_the_servers_own_work() -> None:
    assert effective_max_connections(50_000, 1_048_576) == 50_000
    assert effective_max_connections(50_000, 20_000) == 20_000 - FD_RESERVE
    assert effective_max_connections(50_000, 1024) == 1024 - FD_RESERVE
    assert effective_max_connections(5, 1024) == 5  # an operator's smaller cap stands
    assert effective_max_connections(50_000, 100) == 16  # a tiny limit still leaves a few connections
    # the agent's listeners share the descriptors: the inference port, the tier port, gRPC
    assert effective_max_connections(1024, 65_536, listeners=3) == 1024
    assert effective_max_connections(1024, 1024, listeners=3) == (1024 - FD_RESERVE) // 3
    assert effective_max_connections(1024, 300, listeners=2) == (300 - FD_RESERVE) // 2
    assert effective_max_connections(1024, 280, listeners=3) == 16


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard)

    def lower() -> None:  # the shell's or systemd's default soft limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    code = (
        "import resource; from strata.core.openfiles import raise_open_files_limit\n"
        "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "print(before, raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=lower, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = hard if hard != resource.RLIM_INFINITY else max(low, 1 << 20)
    assert done.stdout.split() == [str(low), str(expected), str(expected)]
