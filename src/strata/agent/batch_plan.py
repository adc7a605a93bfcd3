"""Dynamic batching and admission control: the pure decisions, with `now` passed in.

`plan_batch` decides when a model's queue should give up a batch and which requests go in it (Triton's dynamic
batcher semantics: a full batch or a preferred size goes at once, otherwise the oldest request waits at most
`max_queue_delay_us`); `admit` decides whether a new request may join the queue or is shed at once, because the
queue is full or because the wait it would face is over the bound. `resolve_config` says how one model is
batched, from the agent's options, the package's policy and the model's signature. The driver
(`strata.agent.scheduler`) owns the queue, the clock and the worker threads; nothing here does I/O.

Batching must not change answers: requests are merged only when every input and every output has a dynamic
first axis (the batch) and the runtime computes each row on its own. A model whose activations are quantized
per tensor at run time (onnxruntime's dynamic quantization) is not row-independent: a request's answer would
depend on the requests batched with it, so such a model is not batched unless its package's policy asks for it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from strata.core.errors import ConfigError
from strata.core.package import TensorSpec

POLICY_KEY: Final = "batching"  # the manifest's policy section that may override the agent's settings
_POLICY_FIELDS: Final = (
    "max_batch_size",
    "max_queue_delay_us",
    "preferred_batch_sizes",
    "max_queue_size",
    "max_queue_wait_ms",
    "instances",
)


@dataclass(frozen=True)
class BatchingConfig:
    """How one model's requests are queued and batched.

    Attributes:
        max_batch_size: the most rows one runtime call takes; 1 turns batching off. A single request with more
            rows than this still runs, alone.
        max_queue_delay_us: how long the oldest queued request may wait for others to join its batch when a
            worker is free; 0 sends whatever is queued at once (batches then form from what arrives while the
            workers are busy).
        preferred_batch_sizes: sizes a batch is cut at when the queue holds exactly that many rows of one
            shape (Triton's preferred sizes); a full batch always goes.
        max_queue_size: the most requests waiting for a worker; one more is shed with 503.
        max_queue_wait_ms: shed a request at once when the wait it would face in the queue is estimated above
            this; None: no bound but the queue size.
        instances: how many runtime calls of this model may run at once, each on a worker thread. Two by
            default: one batch computes while the next is formed and the last one's answers are encoded, and
            both cores of a small node stay busy without onnxruntime's spinning threads (MiniLM int8 serves
            about a third more requests per second than with one on a 2-core node).
    """

    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    max_queue_wait_ms: float | None = 5000.0
    instances: int = 2

    def __post_init__(self) -> None:
        """Raises:
        ConfigError: a setting is out of range.
        """
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ConfigError(f"max_queue_delay_us must not be negative, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ConfigError(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.max_queue_wait_ms is not None and self.max_queue_wait_ms <= 0:
            raise ConfigError(f"max_queue_wait_ms must be positive (or absent), got {self.max_queue_wait_ms}")
        if self.instances < 1:
            raise ConfigError(f"instances must be at least 1, got {self.instances}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ConfigError(f"preferred batch size {size} is not between 1 and max_batch_size")

    @property
    def batching(self) -> bool:
        """Whether requests may be merged at all."""
        return self.max_batch_size > 1


def policy_overrides(policy: Mapping[str, Any]) -> dict[str, Any]:
    """The batching settings a package's policy sets (`policy["batching"]`), checked for type.

    Raises:
        ConfigError: the section is not an object, names an unknown setting, or a value has the wrong type.
    """
    section = policy.get(POLICY_KEY)
    if section is None:
        return {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"policy.{POLICY_KEY} must be an object")
    out: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _POLICY_FIELDS:
            raise ConfigError(f"policy.{POLICY_KEY}.{key} is not a batching setting; use one of {_POLICY_FIELDS}")
        if key == "preferred_batch_sizes":
            if not isinstance(value, list) or not all(_is_int(v) for v in value):
                raise ConfigError(f"policy.{POLICY_KEY}.{key} must be a list of integers")
            out[key] = tuple(value)
        elif key == "max_queue_wait_ms":
            if value is not None and not (_is_int(value) or isinstance(value, float)):
                raise ConfigError(f"policy.{POLICY_KEY}.{key} must be a number or null")
            out[key] = value
        else:
            if not _is_int(value):
                raise ConfigError(f"policy.{POLICY_KEY}.{key} must be an integer")
            out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def batchable_signature(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> bool:
    """Whether requests to a model with this signature can be concatenated along their first axis and split back:
    every input and every output has a dynamic first dimension."""
    return bool(inputs) and all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs))


def resolve_config(
    defaults: BatchingConfig,
    policy: Mapping[str, Any],
    *,
    signature_batchable: bool,
    rows_independent: bool,
) -> BatchingConfig:
    """How one model is batched: the agent's settings, overridden by the package's policy, batching turned off
    when the signature cannot be split back, or when the runtime mixes rows (dynamic quantization) and the
    package does not ask for batching itself.

    Raises:
        ConfigError: the package's policy is malformed or out of range.
    """
    overrides = policy_overrides(policy)
    config = replace(defaults, **overrides)
    package_asks = overrides.get("max_batch_size", 1) > 1
    if not signature_batchable or not (rows_independent or package_asks):
        config = replace(config, max_batch_size=1, preferred_batch_sizes=())
    return config


# --- batch formation -------------------------------------------------------------------------------------


class Queued(Protocol):
    """What the batch planner reads of a queued request."""

    @property
    def rows(self) -> int: ...

    @property
    def key(self) -> Hashable | None:
        """Requests with equal keys can share a runtime call; None never shares."""

    @property
    def enqueued_ns(self) -> int: ...


@dataclass(frozen=True)
class Cut:
    """Run these queued requests (positions in the queue, oldest first) in one runtime call now."""

    positions: tuple[int, ...]
    rows: int


@dataclass(frozen=True)
class WaitUntil:
    """Nothing to run yet: plan again at `deadline_ns` (or when a request arrives)."""

    deadline_ns: int


def plan_batch(queue: Sequence[Queued], now_ns: int, config: BatchingConfig) -> Cut | WaitUntil | None:
    """The next batch to run on a free worker, given the queue oldest first; None when the queue is empty.

    The oldest request always goes in the next batch (no starvation); the requests of its key after it join in
    arrival order while they fit in `max_batch_size` rows. The batch goes now when it is full, when the rows
    at hand reach the largest preferred size (cut at the largest preferred size they pass exactly), or when
    the oldest request has waited `max_queue_delay_us`; otherwise the planner asks to be called again at that
    deadline. A batch that goes at the deadline is cut at the largest preferred size it reaches, if any.
    """
    if not queue:
        return None
    head = queue[0]
    if head.key is None or not config.batching or head.rows >= config.max_batch_size:
        return Cut((0,), head.rows)
    positions = [0]
    sums = [head.rows]
    full = False
    for position in range(1, len(queue)):
        item = queue[position]
        if item.key != head.key:
            continue
        if sums[-1] + item.rows > config.max_batch_size:
            full = True
            break
        positions.append(position)
        sums.append(sums[-1] + item.rows)
        if sums[-1] == config.max_batch_size:
            full = True
            break
    if full:
        return Cut(tuple(positions), sums[-1])
    reached = [i for i, total in enumerate(sums) if total in config.preferred_batch_sizes]
    if reached and sums[-1] >= max(config.preferred_batch_sizes):
        last = reached[-1]
        return Cut(tuple(positions[: last + 1]), sums[last])
    deadline = head.enqueued_ns + config.max_queue_delay_us * 1000
    if now_ns < deadline:
        return WaitUntil(deadline)
    if reached:
        last = reached[-1]
        return Cut(tuple(positions[: last + 1]), sums[last])
    return Cut(tuple(positions), sums[-1])


# --- admission -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueLoad:
    """What admission knows about a model's queue when a request arrives.

    Attributes:
        queued_requests, queued_rows: waiting for a worker now (not counting the new request).
        busy_remaining_s: when every instance is busy, the estimated time until the first one frees; else 0.
        rows_per_s: the measured throughput of one instance (rows per second of runtime calls, recent
            average); None before the model has run.
    """

    queued_requests: int
    queued_rows: int
    busy_remaining_s: float
    rows_per_s: float | None


@dataclass(frozen=True)
class Shed:
    """Refuse the request at once: 503 with `Retry-After: retry_after_s`, because of `reason`."""

    reason: str
    retry_after_s: int


def estimate_wait_s(load: QueueLoad, instances: int) -> float | None:
    """The time a request arriving now would wait before its batch starts: until an instance frees, then the
    rows queued ahead of it at the measured throughput of all instances; None when there is no measure yet."""
    if load.rows_per_s is None or load.rows_per_s <= 0:
        return None
    return load.busy_remaining_s + load.queued_rows / (load.rows_per_s * instances)


def admit(load: QueueLoad, config: BatchingConfig) -> Shed | None:
    """None to queue the request; a `Shed` when the queue is full or the estimated wait exceeds the bound.

    Retry-After is the estimated time to drain what is queued, in whole seconds, at least 1 (HTTP's unit).
    """
    wait = estimate_wait_s(load, config.instances)
    retry_after = max(1, math.ceil(wait)) if wait is not None else 1
    if load.queued_requests >= config.max_queue_size:
        return Shed(f"the queue is full ({load.queued_requests} requests waiting)", retry_after)
    if config.max_queue_wait_ms is not None and wait is not None and wait * 1000 > config.max_queue_wait_ms:
        return Shed(
            f"the estimated queue wait of {wait * 1000:.0f} ms exceeds {config.max_queue_wait_ms:g} ms", retry_after
        )
    return None


INLINE_RUN_NS: Final = 200_000  # a batch whose model call should take less than this runs on the event loop
INLINE_WALL_FACTOR: Final = 10  # and whose last call took at most this many times as long in wall time


def runs_inline(
    rows: int,
    ns_per_row: float | None,
    last_cost_ns: int | None,
    last_wall_ns: int | None,
    limit_ns: int = INLINE_RUN_NS,
) -> bool:
    """Whether a batch of `rows` should run right on the event loop instead of on a worker thread.

    Handing a batch to a worker and its answers back costs tens of microseconds of the loop's time and passes
    the GIL back and forth, which is more than a small model's call takes (digits: 20-50 µs for 1-32 rows).
    So a batch runs on the loop when the model's CPU cost is known (`ns_per_row` lately, `last_cost_ns` in its
    last batch), this batch's call is expected to cost under `limit_ns`, the last one did, and the last call's
    wall time (`last_wall_ns`) was not far above its cost: a call that waited (on a lock, a device, a gate)
    costs little CPU but would hold the loop. A model that is slow, or was slow the last time, stays on the
    workers so that the loop keeps answering while it computes.
    """
    if ns_per_row is None or last_cost_ns is None or last_wall_ns is None or last_cost_ns > limit_ns:
        return False
    if last_wall_ns > INLINE_WALL_FACTOR * limit_ns:
        return False
    return rows * ns_per_row <= limit_ns


def cost_follows_rows(inputs: Sequence[TensorSpec]) -> bool:
    """Whether a batch's cost can be told from its rows alone: every input is numeric with a fixed size past the
    batch axis. `runs_inline`'s estimate is a cost per row; an input with another dynamic axis (a sequence, an
    image side) or BYTES elements lets one request's rows be as large as its body allows, and such a request,
    predicted cheap from smaller ones, would hold the event loop for as long as it computes.
    """
    return all(spec.datatype != "BYTES" and all(dim >= 0 for dim in spec.shape[1:]) for spec in inputs)


def ewma(previous: float | None, sample: float, weight: float = 0.2) -> float:
    """Exponentially weighted moving average; the first sample stands alone."""
    return sample if previous is None else previous + weight * (sample - previous)
