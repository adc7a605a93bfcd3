"""`make demo` is the project's main job (`strata demo`): run it as a user does, in its own process, and hold it
to what it says it shows and to leaving nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import processes_mentioning

pytestmark = pytest.mark.slow


def test_the_demo_runs_its_whole_fleet_and_stops_every_process_it_started(tmp_path: Path) -> None:
    strata = Path(sys.executable).with_name("strata")
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [str(strata), "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr  # the steps go to stderr, the tables to stdout
    for step in (
        "the control plane refuses an unsigned package",
        "check answers: eu-west serves v2, us-east still v1",
        "stop every process the demo started",
        "demo passed in",
    ):
        assert step in out, step
    assert "Traceback" not in out
    # a step's details come under its ✓ line (the refusal came above it), and the demo says what it stops
    lines = done.stderr.splitlines()
    refused = next(i for i, line in enumerate(lines) if line.startswith("  refused: "))
    assert "the control plane refuses an unsigned package" in lines[refused - 1], lines[refused - 1]
    assert f"the demo now stops the fleet; its files stay in {workdir}" in " ".join(done.stderr.split())
    # the fleet table: v2 went to region=eu-west only
    versions = dict(re.findall(r"(edge-eu-1|edge-us-1|gateway-eu-1)\b.*?digits=(\d)", out))
    assert versions == {"edge-eu-1": "2", "gateway-eu-1": "2", "edge-us-1": "1"}
    assert processes_mentioning(str(workdir)) == []  # the demo's server and agents are gone with it
    # Run again into the same folder: refused before any work (it used to train both models first, then stop at
    # the release key it never overwrites).
    again = subprocess.run([str(strata), "demo", "--workdir", str(workdir)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2, again.stderr
    assert "holds an earlier demo" in again.stderr
    assert "train two versions" not in again.stderr
