"""How fast the rollout planner steps, and how fast the simulator runs each shipped scenario.

The planner is stepped on a rollout in its last wave over N nodes (every node released, half of them healthy),
which is its most expensive state: one step is what the control plane's driver does after a burst of status
reports. Then each scenario in scenarios/ runs at its own size and at 10,000 nodes, reporting virtual node-hours
simulated per second of wall time. Prints JSON.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from strata.control.rollout_plan import (
    NodeObservation,
    RolloutSpec,
    RolloutState,
    apply_actions,
    parse_waves,
    plan_rollout,
)
from strata.core.wire import ServingCounters
from strata.sim import load_scenario, run_scenario

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"


def planner_step_ms(nodes: int) -> float:
    observations = {
        f"n{i}": NodeObservation(
            node_id=f"n{i}",
            labels={"region": ("eu", "us", "ap")[i % 3]},
            tier="device",
            profile=("x86_64-avx2", "arm64-neon")[i % 2],
            online=True,
            version="1",
            probation="passed",
            serving=ServingCounters(100, 0, 4.0, 0.0),
        )
        for i in range(nodes)
    }
    spec = RolloutSpec(waves=parse_waves("100%"), bake_s=60)
    state = RolloutState(id=1, model="m", version="2", selector={}, spec=spec, created_at=0.0)
    state = apply_actions(state, plan_rollout(state, observations, 0.0))
    for i, node_id in enumerate(sorted(state.released)):
        if i % 2:
            observations[node_id] = replace(observations[node_id], version="2")
    state = apply_actions(state, plan_rollout(state, observations, 1.0))
    steps = 20
    started = time.perf_counter()
    for step in range(steps):
        plan_rollout(state, observations, 2.0 + step)
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    result: dict[str, object] = {"benchmark": "rollout_planner"}
    result["planner_step_ms"] = {str(n): round(planner_step_ms(n), 2) for n in (1_000, 10_000, 50_000)}
    scenarios: dict[str, object] = {}
    for path in sorted(SCENARIOS.glob("*.yaml")):
        scenario = load_scenario(path)
        for nodes in (scenario.nodes, 10_000):
            summary = run_scenario(scenario, nodes=nodes)
            keys = (
                "rollout_status",
                "failed_gate",
                "converged_fraction",
                "reachable_nodes",
                "time_to_finish_s",
                "time_to_converge_s",
                "nodes_ever_on_bad_version",
                "first_wave_nodes",
                "rolled_back",
                "bytes_downloaded",
                "lost_nodes",
                "wall_s",
                "virtual_node_hours_per_s",
            )
            picked = {k: summary[k] for k in keys}
            if picked["failed_gate"]:
                gate = summary["failed_gate"]
                picked["failed_gate"] = f"{gate['gate']} = {gate['value']:.3g} (wave {gate['wave'] + 1})"
            scenarios[f"{scenario.name}@{nodes}"] = picked
    result["scenarios"] = scenarios
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
