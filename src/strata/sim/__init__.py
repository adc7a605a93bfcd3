"""The fleet simulator: thousands of virtual nodes driving the real rollout planner and the real agent `plan()`.

`strata sim --nodes N --scenario FILE [--seed S] [--json]` runs a scenario (`strata.sim.scenario`, YAML; the
repository ships some in `scenarios/`) with `strata.sim.engine` and prints its summary: how much of the reachable
fleet converged and how long it took (virtual seconds), how many nodes ever ran a bad version, whether the rollout
rolled back and which gate failed with its numbers, bytes downloaded, and the simulator's speed in virtual
node-hours per second of wall time.
"""

from strata.sim.engine import Simulation, run_scenario
from strata.sim.scenario import Scenario, load_scenario

__all__ = ["Scenario", "Simulation", "load_scenario", "run_scenario"]
