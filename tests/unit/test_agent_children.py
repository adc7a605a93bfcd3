"""The agent's one runner of helper children: a payload in, an answer out, and a clear error for a child that fails,
is killed, runs past its time or writes more than it may. The children are real Python processes running small
modules written into the test's folder (`python -m` finds them in the working folder)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from strata.agent.children import ChildFailed, run_child, run_module
from strata.core.errors import ConfigError


@pytest.fixture
def helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    modules = {
        "reverse_child": "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])",
        "failing_child": "import sys; print('warming up', file=sys.stderr); sys.exit('no key at /x')",
        "silent_child": "import sys; sys.exit(3)",
        "killed_child": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "sleepy_child": "import time; time.sleep(30)",
        "chatty_child": "import sys; sys.stdout.buffer.write(b'x' * 100_000); sys.stdout.flush()",
    }
    for name, code in modules.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_payload_goes_in_and_the_answer_comes_out(helpers: Path) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB: more than a pipe holds, both ways
    assert run_module("reverse_child", [], payload, timeout_s=30, what="the reverser") == payload[::-1]
    done = run_child("silent_child", timeout_s=30, what="a helper", optimize=False)
    assert (done.returncode, done.stdout, done.failure()) == (3, b"", "exit status 3")
    assert done.failure("no output") == "no output"


def test_a_failure_says_its_last_line_or_the_signal_that_killed_it(helpers: Path) -> None:
    with pytest.raises(ConfigError, match=r"^the key helper failed: no key at /x$"):
        run_module("failing_child", [], timeout_s=30, what="the key helper")
    with pytest.raises(ConfigError, match=r"^the TPM helper failed: killed by SIGKILL$"):
        run_module("killed_child", [], timeout_s=30, what="the TPM helper")


def test_a_child_that_runs_too_long_or_says_too_much_is_killed(helpers: Path) -> None:
    with pytest.raises(ChildFailed, match=r"^the verifier did not finish in 0.5 s$") as late:
        run_child("sleepy_child", timeout_s=0.5, what="the verifier")
    assert late.value.reason == "it did not finish in 0.5 s"
    with pytest.raises(ChildFailed, match=r"^the verifier wrote more than 1000 bytes to stdout$"):
        run_child("chatty_child", timeout_s=30, what="the verifier", max_output=1000)
    with pytest.raises(ChildFailed, match=r"^the verifier could not start: .*nonexistent") as missing:
        run_child("reverse_child", timeout_s=30, what="the verifier", python="/nonexistent/python")
    assert "nonexistent" in missing.value.reason
