"""`strata demo` stopped by a signal (apart from test_demo.py, so that another worker runs it: tests are spread
over workers by file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import processes_mentioning

pytestmark = pytest.mark.slow


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
    assert processes_mentioning(str(workdir)) == []


def test_a_kept_demo_is_driven_by_the_cli_lines_it_prints_and_stops_at_ctrl_c(tmp_path: Path) -> None:
    """`strata demo --keep` prints how to point the CLI at its fleet (the admin token read from its file, paths
    quoted: this folder has a space); the CLI run with exactly that line sees the three nodes; Ctrl-C stops it all."""
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
            env={**clean, "COLUMNS": "80"},  # narrow: the export line must still come out whole
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
    text = log.read_text()
    assert demo.returncode == 0, text[-3000:]
    assert "demo passed" in text
    assert "Traceback" not in text
    assert processes_mentioning(str(workdir)) == []


def _agents_running(workdir: Path) -> int:
    return sum("strata.agent" in _cmdline(pid) for pid in processes_mentioning(str(workdir)))


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
