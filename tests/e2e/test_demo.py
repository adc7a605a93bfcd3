"""`make demo` is the project's main job (`strata demo`): run it as a user does, in its own process, and hold it
to what it says it shows and to leaving nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _processes_mentioning(text: str) -> list[int]:
    """The processes whose command line or environment names `text` (the demo's folder: its server is started in
    it, and its agents, which exec into `python -OO -m strata.agent`, carry their data folder in
    STRATA_AGENT_CONFIG)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
            except OSError:  # the process ended while we looked, or is not ours to read
                continue
            if text in seen.decode(errors="replace"):
                found.append(int(entry.name))
    return found


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
    assert _processes_mentioning(str(workdir)) == []  # the demo's server and agents are gone with it
    # Run again into the same folder: refused before any work (it used to train both models first, then stop at
    # the release key it never overwrites).
    again = subprocess.run([str(strata), "demo", "--workdir", str(workdir)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2, again.stderr
    assert "holds an earlier demo" in again.stderr
    assert "train two versions" not in again.stderr


def test_a_demo_stopped_by_sigterm_stops_every_process_it_started(tmp_path: Path) -> None:
    """`kill` (SIGTERM: a service manager, a CI job's timeout) in the middle of the demo, its agents running: the
    demo stops its server and agents as it does at Ctrl-C. It used to end alone, leaving them on their ports."""
    strata = Path(sys.executable).with_name("strata")
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        demo = subprocess.Popen(
            [str(strata), "demo", "--workdir", str(workdir)], stdout=sink, stderr=subprocess.STDOUT, text=True
        )
        try:
            deadline = time.monotonic() + 240
            while _agents_running(workdir) < 3:
                assert demo.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            demo.send_signal(signal.SIGTERM)
            demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert demo.returncode != 0
    assert "Traceback" not in log.read_text()
    assert _processes_mentioning(str(workdir)) == []


def _agents_running(workdir: Path) -> int:
    return sum("strata.agent" in _cmdline(pid) for pid in _processes_mentioning(str(workdir)))


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
