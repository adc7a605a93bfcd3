"""`make demo` is the project's main job (`strata demo`): run it as a user does, in its own process, and hold it
to what it says it shows and to leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import processes_mentioning

pytestmark = pytest.mark.slow


def test_the_demo_runs_its_whole_fleet_and_stops_every_process_it_started(tmp_path: Path) -> None:
    """`strata demo --keep`, as a user who then looks at the fleet: every step, the fleet table, then the line that
    points the CLI at the kept fleet (the admin token read from its file, paths quoted: this folder has a space) run
    as printed, then Ctrl-C stops everything. (Without --keep the demo stops at once: `ending` says so.)"""
    strata = Path(sys.executable).with_name("strata")
    workdir = tmp_path / "kept demo"
    log = tmp_path / "demo.log"
    clean = {key: value for key, value in os.environ.items() if not key.startswith("STRATA_")}
    with log.open("w") as sink:
        demo = subprocess.Popen(
            [str(strata), "demo", "--keep", "--workdir", str(workdir)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            env={**clean, "COLUMNS": "200"},
        )
        try:
            deadline = time.monotonic() + 240
            while "strata nodes list;" not in log.read_text():
                assert demo.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            export = next(line.strip() for line in log.read_text().splitlines() if "export STRATA_SERVER=" in line)
            token = next((workdir / "fleet").rglob("admin.token")).read_text().strip()
            assert token not in log.read_text()  # read from its file by the line, never printed
            listed = subprocess.run(
                ["bash", "-c", f"{export} && strata nodes list --json"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**clean, "PATH": f"{strata.parent}:{clean.get('PATH', '')}"},
            )
            assert listed.returncode == 0, listed.stderr
            assert sorted(node["name"] for node in json.loads(listed.stdout)) == [
                "edge-eu-1",
                "edge-us-1",
                "gateway-eu-1",
            ]
            demo.send_signal(signal.SIGINT)
            demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
    out = log.read_text()
    assert demo.returncode == 0, out[-3000:]
    for step in (
        "the control plane refuses an unsigned package",
        "check answers: eu-west serves v2, us-east still v1",
        "stop every process the demo started",
        "demo passed in",
    ):
        assert step in out, step
    assert "Traceback" not in out
    # a step's details come under its ✓ line (the refusal came above it), and the demo says what it stops
    lines = out.splitlines()
    refused = next(i for i, line in enumerate(lines) if line.startswith("  refused: "))
    assert "the control plane refuses an unsigned package" in lines[refused - 1], lines[refused - 1]
    assert f"then the demo stops it; its files stay in {workdir}" in " ".join(out.split())
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
