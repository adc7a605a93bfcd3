"""Serving from every core: how many processes serve a node, with how many threads, and their shares of its
budgets (the processes themselves: `strata.agent.pool` and `strata.agent.worker`).

One Python process serves at most one core's worth of HTTP and Python work, however many threads onnxruntime
has. On a node with N cores (`--serve-processes`, default: every core except on devices, which keep one
process and their memory budget) the agent starts N-1 serving processes, `python -OO -m strata.agent.worker`,
beside its own. Each accepts on the agent's listening sockets, handed down at its start with the memory where
each says how many connections it holds (one accept queue, the least loaded taking: `strata.agent.httpd.AcceptShare`),
loads the same verified packages (in the clear: from the package folder,
which it verifies again; sealed: the agent opens them once and sends the decrypted files over the process's
channel) with
`--intra-op-threads` threads each (default: cores / processes, so processes x threads <= cores), and answers
requests exactly as the agent's own listener does.

What stays one for the node:
- the models: `strata.agent.pool.ServingPool` is the repository's mirror. A new version is loaded and
  golden-checked in every serving process, then switched in each, and only then in the agent, which drops the
  old one; requests in flight finish on the version they started on everywhere. A process that fails to load it
  is restarted.
- /metrics: whichever process is asked, the agent collects every process's registry and adds them up.
- probation and status counters: every second the agent takes each process's serving counts into its own
  tracker, so probation judges the requests of all processes.
- telemetry: each process records its own outcomes, exactly once, into the node's SQLite buffer (WAL; each
  group commit is one transaction), and only the agent uploads.
- the budgets: each process gets its share of the queue size per model, of the connection cap and of the
  request-body budget (`share`).
The mutual-TLS tier listener (and the relay) stay in the agent's process.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Final

from strata.agent.batch_plan import BatchingConfig
from strata.agent.config import AgentConfig
from strata.agent.httpd import ServerLimits
from strata.agent.telemetry import TelemetryConfig
from strata.core.errors import ConfigError

# families the agent's own process alone describes (the others' copies would be counted twice)
AGENT_ONLY_METRICS: Final = ("strata_agent_info", "strata_model_active")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def plan_serving(tier: str, cores: int, processes: int | None, threads: int | None) -> tuple[int, int | None]:
    """(serving processes, onnxruntime intra-op threads per model) for a node: `processes` default to every
    core but on devices (one process: their memory budget); threads default to cores / processes, or to
    onnxruntime's own choice (every core) with one process.

    Raises:
        ConfigError: a setting is below 1, or processes x threads exceeds the cores.
    """
    if processes is not None and processes < 1:
        raise ConfigError(f"--serve-processes must be at least 1, got {processes}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--intra-op-threads must be at least 1, got {threads}")
    chosen = processes if processes is not None else (1 if tier == "device" else cores)
    if chosen > cores:  # one intra-op thread each is already more than the cores (64 on 2 cores were started)
        raise ConfigError(
            f"--serve-processes {chosen} is more than this node's {cores} cores; they would fight over them"
        )
    if threads is None:
        return chosen, None if chosen == 1 else max(1, cores // chosen)
    if chosen * threads > cores:
        raise ConfigError(
            f"{chosen} serving processes x {threads} intra-op threads is more than this node's {cores} cores; "
            "they would fight over them"
        )
    return chosen, threads


def share(config: AgentConfig, processes: int) -> tuple[ServerLimits, BatchingConfig]:
    """One serving process's share of the node's budgets: the connection cap, the request bodies in flight
    (never less than one largest request) and each model's queue size, divided by `processes`."""
    limits = ServerLimits(
        max_body_bytes=config.max_request_bytes,
        max_connections=max(1, config.max_connections // processes),
        max_body_bytes_in_flight=max(config.max_request_bytes, config.request_budget_bytes // processes),
        header_timeout=config.header_timeout_s,
        body_timeout=config.body_timeout_s,
    )
    batching = config.batching
    return limits, replace(batching, max_queue_size=max(1, batching.max_queue_size // processes))


def telemetry_config(config: AgentConfig) -> TelemetryConfig:
    """The node's telemetry buffer settings (one buffer, shared by its serving processes)."""
    return TelemetryConfig(
        path=config.data_dir / "telemetry.db",
        budget_bytes=int(config.telemetry_budget_mb * (1 << 20)),
        sample_rate=config.telemetry_sample_rate,
        slow_us=config.telemetry_slow_ms * 1000,
        upload_interval_s=config.telemetry_interval_s,
    )
