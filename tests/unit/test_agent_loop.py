"""The agent loop's own decisions: how long a poll may wait (the reconciler is a small stand-in)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.loop import AgentLoop, start_thread
from strata.agent.transport import H11Transport
from strata.core.errors import TransportError


class CutReconciler:
    """Converges by failing once with a transport error (a download cut mid-way), then succeeding."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(failures={})
        self.cuts = 1

    def converge(self, desired: object) -> int:
        if self.cuts:
            self.cuts -= 1
            raise TransportError("connection reset mid-download")
        return 0

    def probation_due(self) -> float | None:
        return None

    def next_retry_s(self) -> float | None:
        return None


def make_loop(tmp_path: Path, reconciler: CutReconciler, **fields: Any) -> AgentLoop:
    """An agent loop of node n1 over `reconciler`, its configuration's other `fields` as given."""
    config = AgentConfig(server="https://cp.example", data_dir=tmp_path, name="n1", tier="device", **fields)
    return AgentLoop(config, ControlPlaneClient(config.server, H11Transport()), reconciler)


def test_a_cut_convergence_makes_the_next_poll_not_wait(tmp_path: Path) -> None:
    """A download cut off (or a start-up convergence that could not finish) resumes on the next round at once,
    not after a quiet long poll (issue 17)."""
    loop = make_loop(tmp_path, CutReconciler(), poll_wait_s=30)
    loop._reported = b"{}"  # as after its first report (see the next test)
    assert loop.poll_wait() == 30
    with pytest.raises(TransportError):
        loop.converge()
    assert loop.poll_wait() == 0
    loop.converge()
    assert loop.poll_wait() == 30


def test_a_just_started_agent_reports_before_its_first_long_poll(tmp_path: Path) -> None:
    """The first poll after a start does not wait: the node reports what it serves, and what failed (a load the
    agent died in, found at start-up), at once rather than after a quiet long poll."""
    loop = make_loop(tmp_path, CutReconciler(), poll_wait_s=30)
    assert loop.poll_wait() == 0
    loop._reported = b"{}"
    assert loop.poll_wait() == 30


class FullDiskReconciler(CutReconciler):
    """Converges by failing as a full disk does."""

    def converge(self, desired: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_no_error_of_a_round_ends_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk in the convergence from the stored desired state at start-up, a bug in a round, a full disk in
    the next: each is said and tried again after a back-off. Its thread ending would leave the node serving with
    nobody converging, reporting or rolling back (and the agent stopping with exit status 0)."""
    loop = make_loop(tmp_path, FullDiskReconciler(), backoff_min_s=0.01, backoff_max_s=0.02)
    monkeypatch.setattr(loop, "adopt_stored", lambda: True)  # an enrolled node
    rounds: list[int] = []

    def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise KeyError("a bug")
        if len(rounds) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        loop.stop.set()

    monkeypatch.setattr(loop, "step", step)
    with caplog.at_level(logging.INFO, logger="strata.agent.loop"):
        thread = start_thread(loop)
        thread.join(30)
    assert not thread.is_alive()
    assert len(rounds) == 3
    assert loop.fatal is None
    io_errors = [r for r in caplog.records if r.getMessage().startswith("local I/O error")]
    assert len(io_errors) == 2  # the start-up convergence and the second round
    (bug,) = [r for r in caplog.records if r.getMessage().startswith("unexpected error in the agent's loop")]
    assert bug.exc_info is not None
    assert bug.exc_info[0] is KeyError


def test_a_node_not_enrolled_yet_does_not_say_it_serves_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before its enrollment a node serves nothing: an unreachable control plane is said without "serving on"."""
    loop = make_loop(tmp_path, CutReconciler(), backoff_min_s=0.01, backoff_max_s=0.02)
    monkeypatch.setattr(loop, "adopt_stored", lambda: False)  # no stored identity: enrolls in its first round
    rounds: list[int] = []

    def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) == 1:
            raise TransportError("connection refused")
        loop.stop.set()

    monkeypatch.setattr(loop, "step", step)
    with caplog.at_level(logging.WARNING, logger="strata.agent.loop"):
        thread = start_thread(loop)
        thread.join(30)
    (said,) = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert "not enrolled yet, nothing to serve" in said
    assert "serving on" not in said


class WatchingReconciler(CutReconciler):
    """Has a probation due at once, and counts its checks."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def probation_due(self) -> float | None:
        return 0.001

    def check_probation(self) -> None:
        self.checks += 1


def test_a_round_that_fails_every_time_still_judges_probations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (or a full disk) in every round: the back-off still judges the probation under way, so a bad version
    still rolls back by itself (it waited on the stop event alone, and no probation was judged)."""
    reconciler = WatchingReconciler()
    loop = make_loop(tmp_path, reconciler, backoff_min_s=0.05, backoff_max_s=0.05)
    monkeypatch.setattr(loop, "adopt_stored", lambda: False)
    rounds: list[int] = []

    def step() -> None:
        rounds.append(len(rounds))
        if len(rounds) >= 3:
            loop.stop.set()
        raise (KeyError("a bug") if len(rounds) % 2 else OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(loop, "step", step)
    thread = start_thread(loop)
    thread.join(30)
    assert not thread.is_alive()
    assert reconciler.checks >= 2
