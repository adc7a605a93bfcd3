"""`strata demo` stopped by a signal (apart from test_demo.py, so that another worker runs it: tests are spread
over workers by file)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e_helpers import processes_mentioning

pytestmark = pytest.mark.slow


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint-inherited-ignored"])
def test_a_demo_stopped_by_a_signal_stops_every_process_it_started(tmp_path: Path, signum: int) -> None:
    """`kill` (SIGTERM: a service manager, a CI job's timeout) in the middle of the demo, its agents running: the
    demo stops its server and agents as it does at Ctrl-C. It used to end alone, leaving them on their ports.
    Ctrl-C (SIGINT) to a demo started in the background by a shell without job control, which inherits SIGINT
    ignored (Python then leaves it ignored): nothing happened, and `--keep` ran on for ever."""
    strata = Path(sys.executable).with_name("strata")
    workdir = tmp_path / "demo"
    log = tmp_path / "demo.log"
    with log.open("w") as sink:
        demo = subprocess.Popen(
            [str(strata), "demo", "--workdir", str(workdir)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=_ignore_sigint if signum == signal.SIGINT else None,
        )
        try:
            deadline = time.monotonic() + 240
            while _agents_running(workdir) < 3:
                assert demo.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            demo.send_signal(signum)
            demo.wait(60)
        finally:
            if demo.poll() is None:
                demo.kill()
    assert demo.returncode == 130
    said = " ".join(log.read_text().split())
    assert "Traceback" not in said
    name = signal.Signals(signum).name
    assert f"interrupted ({name}): the demo stopped every process it started; its files stay in" in said
    assert processes_mentioning(str(workdir)) == []


def _agents_running(workdir: Path) -> int:
    return sum("strata.agent" in _cmdline(pid) for pid in processes_mentioning(str(workdir)))


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
