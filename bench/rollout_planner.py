"""How fast the rollout planner steps, and how fast the simulator runs each shipped scenario.

The planner is stepped on a rollout in its last wave over N nodes (every node released, half of them healthy),
which is its most expensive state: one step is what the control plane's driver does after a burst of status
reports. Then each scenario in scenarios/ runs at its own size and at 10,000 nodes, reporting virtual node-hours
simulated per second of wall time. Last, the fleet-scale target (issue 12): good-rollout.yaml (a 2-day horizon, so
more than the 24 h rollout asked for) at 100,000 nodes in under 60 s on one core, with a 10,000-node run beside it
to show how it scales; wall and CPU seconds cover the whole run, building the fleet included.
Prints JSON; `--scale` runs only the last part.
"""

from __future__ import annotations

import argparse
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
SCALE_TARGET_S = 60.0


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


def fleet_scale() -> dict[str, object]:
    """The simulator at 10,000 and 100,000 nodes, against the 60 s target for 100,000."""
    scenario = load_scenario(SCENARIOS / "good-rollout.yaml")
    runs: dict[str, object] = {}
    for nodes in (10_000, 100_000):
        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_scenario(scenario, nodes=nodes)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs[str(nodes)] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "virtual_s": summary["virtual_s"],
            "events": summary["events"],
            "planner_runs": summary["planner_runs"],
            "rollout_status": summary["rollout_status"],
            "converged_fraction": summary["converged_fraction"],
            "time_to_finish_s": summary["time_to_finish_s"],
        }
    big, small = runs["100000"], runs["10000"]
    assert isinstance(big, dict)
    assert isinstance(small, dict)
    return {
        "scenario": scenario.name,
        "target_s": SCALE_TARGET_S,
        "runs": runs,
        "wall_vs_target": round(big["wall_s"] / SCALE_TARGET_S, 3),
        "cpu_vs_target": round(big["cpu_s"] / SCALE_TARGET_S, 3),
        "cpu_100k_over_10k": round(big["cpu_s"] / small["cpu_s"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", action="store_true", help="only the 10,000 and 100,000-node simulator runs")
    args = parser.parse_args()
    if args.scale:
        print(json.dumps({"benchmark": "rollout_planner", "fleet_scale": fleet_scale()}, indent=2))
        return
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
    result["fleet_scale"] = fleet_scale()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
