"""What a rollout's steps add to the fleet's event feed (`rollout_events`): a wave's gates passed only where the wave
had nodes for them to judge."""

from __future__ import annotations

from dataclasses import replace

from test_rollout_plan import fleet, rollout, step, take

from strata.control.events import rollout_events
from strata.control.rollout_plan import RolloutState


def told(old: RolloutState, new: RolloutState) -> list[str]:
    return [event.message for event in rollout_events(old, new)]


def test_each_wave_with_nodes_passes_its_gates_and_an_empty_one_is_walked_past_in_silence() -> None:
    """Three nodes in `1%,10%,50%,100%`: the second wave's target is the first's (no node of its own)."""
    observations, feed = fleet(3), []
    state = rollout("1%,10%,50%,100%")
    for now in (0.0, 10.0, 70.0, 80.0, 140.0, 150.0, 210.0):
        new = step(state, observations, now)
        feed += told(state, new)
        state = new
        take(observations, state)
    assert state.status == "succeeded"
    assert [m.split(":")[0] for m in feed] == [
        "wave 1 passed its gates",
        "wave 3 passed its gates",
        "wave 4 passed its gates",
        "rollout 7",
    ]


def test_a_rollout_every_node_is_kept_out_of_passes_no_gate() -> None:
    """New-user trial: a pinned node, a rollout of another version: the feed said "wave 1 passed its gates", then
    that the rollout was aborted with no node taking part."""
    observations = {k: replace(o, excluded="pinned to 1 (pin 3)") for k, o in fleet(2).items()}
    start = rollout("1%,10%,50%,100%")
    ended = step(start, observations, 0.0)
    assert ended.status == "aborted"
    assert [m.split(" (")[0] for m in told(start, ended)] == ["rollout 7: aborted"]


def test_a_wave_whose_nodes_are_all_kept_out_while_it_runs_passes_no_gate() -> None:
    """Review: a pin arriving while wave 1 runs keeps its nodes out; the wave is then walked past (or the rollout
    ends), and the nodes it had before the step made the feed say the wave passed its gates."""
    observations = fleet(3)
    start = rollout("1,100%")
    running = step(start, observations, 0.0)
    assert running.members(0)
    pinned = {k: replace(o, excluded="pinned to 1 (pin 3)") for k, o in observations.items()}
    ended = step(running, pinned, 10.0)
    assert ended.status == "aborted"
    assert not [m for m in told(running, ended) if "passed its gates" in m], told(running, ended)
