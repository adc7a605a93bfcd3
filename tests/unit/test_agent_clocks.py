"""The agent's waits against a wall clock that steps (NTP setting right a node that booted a day fast or an hour
slow): back-offs, a failure's retry, a probation and the hourly attestation are timed on the monotonic clock, the
wall clock only dating what is recorded and sent. Both clocks are fakes here; nothing sleeps."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from strata.agent.attestation import REATTEST_S, Attester
from strata.agent.client import ControlPlaneClient
from strata.agent.config import AgentConfig
from strata.agent.elapsed import Elapsed
from strata.agent.loop import AgentLoop
from strata.agent.probation import ProbationConfig
from strata.agent.reconciler import NodeIdentity, Reconciler
from strata.agent.repository import ModelRepository
from strata.agent.state import FailureRecord, ModelSlots, NodeState, ProbationRecord, SlotRef
from strata.agent.store import ArtifactStore
from strata.agent.transport import H11Transport
from strata.core.profiles import get_profile

DAY = 86400.0
V1 = SlotRef("sha256:" + "1" * 64, "1", "cpu-generic-fp32", 500.0)
V2 = SlotRef("sha256:" + "2" * 64, "2", "cpu-generic-fp32", 1000.0)


class Clocks:
    """A wall clock and a monotonic one; `step` moves the wall clock alone, `advance` both."""

    def __init__(self) -> None:
        self.wall_now = 1_000.0
        self.mono_now = 50.0

    def wall(self) -> float:
        return self.wall_now

    def mono(self) -> float:
        return self.mono_now

    def advance(self, seconds: float) -> None:
        self.wall_now += seconds
        self.mono_now += seconds

    def step(self, seconds: float) -> None:
        self.wall_now += seconds


class SteppedStop(threading.Event):
    """The loop's stop event, whose waits take no real time: each advances the clocks by its timeout, and the first
    also steps the wall clock by `step` (the clock set right while the agent waits)."""

    def __init__(self, clocks: Clocks, step: float) -> None:
        super().__init__()
        self.clocks = clocks
        self.pending_step = step
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        assert len(self.waits) < 10, self.waits  # the old loop waited on, for the clock to catch up
        self.waits.append(timeout)
        self.clocks.advance(timeout)
        self.clocks.step(self.pending_step)
        self.pending_step = 0.0
        return False


class QuietReconciler:
    state = SimpleNamespace(failures={})

    def probation_due(self) -> float | None:
        return None


def test_a_backoff_ends_on_time_when_the_wall_clock_steps_back_during_it(tmp_path: Path) -> None:
    """The review's case: the control plane down, NTP steps the wall clock back a day during the back-off; the agent
    tried again a day later (ten years for a node that booted ten years ahead)."""
    config = AgentConfig(server="https://cp.example", data_dir=tmp_path, name="n1", tier="device")
    loop = AgentLoop(config, ControlPlaneClient(config.server, H11Transport()), QuietReconciler())
    clocks = Clocks()
    loop.clock, loop.monotonic = clocks.wall, clocks.mono
    for step in (-DAY, +DAY):
        stop = loop.stop = SteppedStop(clocks, step)
        loop.wait_offline(10.0)
        assert sum(stop.waits) == 10.0


def make_reconciler(tmp_path: Path, clocks: Clocks, state: NodeState, **fields: Any) -> Reconciler:
    store = ArtifactStore(tmp_path / "node")
    store.save_state(state)
    client = ControlPlaneClient("https://control.invalid", H11Transport())
    identity = NodeIdentity("device", {}, get_profile("cpu-generic"), False, None, "n1")
    return Reconciler(
        store,
        ModelRepository(),
        client,
        identity,
        frozenset({"onnxruntime"}),
        clock=clocks.wall,
        monotonic=clocks.mono,
        boot="",
        **fields,
    )


def on_probation(started_at: float) -> NodeState:
    record = ProbationRecord(V2.version, V2.digest, started_at)
    return NodeState(models={"digits": ModelSlots(active=V2, previous=V1)}, probation={"digits": record})


def test_a_wall_clock_step_forward_does_not_end_a_probation(tmp_path: Path) -> None:
    """The review's case: a 10-minute probation, 20 s in the wall clock steps an hour forward; the version passed
    on the next check, having served nothing."""
    clocks = Clocks()
    reconciler = make_reconciler(
        tmp_path, clocks, on_probation(clocks.wall_now), probation=ProbationConfig(duration_s=600)
    )
    clocks.advance(20)
    reconciler.check_probation()
    clocks.step(3600)
    clocks.advance(5)
    reconciler.check_probation()
    assert "digits" in reconciler.state.probation
    clocks.advance(575)
    reconciler.check_probation()
    assert reconciler.state.probation == {}
    assert reconciler.state.models["digits"].active == V2  # passed, not rolled back


def test_a_wall_clock_step_back_does_not_hold_a_probation(tmp_path: Path) -> None:
    clocks = Clocks()
    reconciler = make_reconciler(tmp_path, clocks, on_probation(clocks.wall_now), probation=ProbationConfig(60))
    reconciler.check_probation()
    clocks.step(-DAY)
    clocks.advance(60)
    reconciler.check_probation()
    assert reconciler.state.probation == {}


def test_a_probation_read_from_the_state_file_counts_from_its_date_at_most(tmp_path: Path) -> None:
    """A record of an older agent (its start a wall-clock date in state.json): its age is read from the wall clock
    once, and a date ahead of the clock counts as now, not as a probation that has to wait for the clock."""
    clocks = Clocks()
    ahead = make_reconciler(tmp_path / "a", clocks, on_probation(clocks.wall_now + DAY), probation=ProbationConfig(60))
    older = make_reconciler(tmp_path / "b", clocks, on_probation(clocks.wall_now - 30), probation=ProbationConfig(60))
    for reconciler in (ahead, older):
        reconciler.check_probation()
        assert "digits" in reconciler.state.probation
    clocks.advance(30)
    older.check_probation()
    assert older.state.probation == {}
    clocks.advance(30)
    ahead.check_probation()
    assert ahead.state.probation == {}


def test_a_failed_install_is_retried_on_time_whatever_the_wall_clock_does(tmp_path: Path) -> None:
    """A load failure is tried again 30 s later (`plan.retry_at`): with the wall clock stepped back a day in
    between, the node waited a day; stepped forward, it does not retry before its time either."""
    clocks = Clocks()
    failure = FailureRecord("digits", "2", V2.variant, "does not load", clocks.wall_now, 1, "health")
    state = NodeState(models={"digits": ModelSlots(active=V1)}, failures={V2.digest: failure})
    reconciler = make_reconciler(tmp_path, clocks, state)
    assert reconciler.next_retry_s() == 30.0
    clocks.advance(10)
    clocks.step(-DAY)
    assert reconciler.next_retry_s() == 20.0
    clocks.step(2 * DAY)
    assert reconciler.next_retry_s() == 20.0
    clocks.advance(20)
    assert reconciler.next_retry_s() == 0.0
    assert reconciler.status(None).failures[0].at == failure.at  # the date reported stays the wall clock's


def test_elapsed_starts_again_for_a_new_date_and_forgets_what_is_gone() -> None:
    clocks = Clocks()
    elapsed = Elapsed(clocks.wall, clocks.mono)
    assert elapsed.since("a", clocks.wall_now - 5) == 5
    clocks.step(-DAY)
    assert elapsed.since("a", clocks.wall_now + DAY - 5) == 5
    assert elapsed.since("a", clocks.wall_now) == 0  # a new date: a new failure under that key
    elapsed.keep(set())
    assert elapsed.since("a", clocks.wall_now + 3) == 0


def test_the_hourly_attestation_is_timed_on_the_monotonic_clock(tmp_path: Path) -> None:
    clocks = Clocks()
    attester = Attester.__new__(Attester)  # only its timing: no identity, TPM or control plane
    attester.clock, attester.monotonic = clocks.wall, clocks.mono
    attester.reconciler = SimpleNamespace(state=NodeState())
    attester._last = ((), clocks.mono_now)
    clocks.step(-DAY)
    clocks.advance(REATTEST_S)
    assert attester.due()
