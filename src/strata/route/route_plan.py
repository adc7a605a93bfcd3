"""Where a request goes next, and how long it may wait there: pure decisions over what the router knows.

Targets are tried in tier order (local, parent, cloud). `next_attempt` skips a target whose breaker is open,
whose last health probe said it cannot serve the model, or that is already tried; with a latency budget it
also skips a target that usually answers slower than the time left, and gives each attempt a timeout that
leaves the next viable target enough time to answer (its usual latency, with a margin) if this one does not.
That is how the budget decides whether to wait or to go elsewhere. When no target is viable but some are
untried and time is left, the untried ones are tried anyway in order (last resort): a stale health probe or
an open breaker must not turn a request away when nothing else can serve it.

`classify` says what an answer means for routing: done, try the next tier (refusals, missing model,
failures), or hand the caller's own mistake back at once.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from strata.route.breaker import Breaker, BreakerConfig

TIERS: Final = ("local", "parent", "cloud")
FALLBACK_MARGIN: Final = 1.5  # the next target's usual latency, times this, is kept in reserve
MIN_ATTEMPT_S: Final = 0.005  # an attempt with less time than this is not worth sending


@dataclass(frozen=True)
class TargetView:
    """What routing knows about one target for one request's model.

    Attributes:
        breaker: the target's circuit breaker.
        ready: the last health probe: True ready (for this model when probed), False not, None not probed yet.
        latency_s: recent latency of its successful answers for this model (moving average), None unknown.
    """

    breaker: Breaker
    ready: bool | None
    latency_s: float | None


@dataclass(frozen=True)
class Attempt:
    """Send the request to target `index`, waiting at most `timeout_s` for its answer."""

    index: int
    timeout_s: float
    last_resort: bool = False


def _viable(view: TargetView, now: float, config: BreakerConfig) -> bool:
    return view.ready is not False and view.breaker.allows(now, config)


def next_attempt(
    targets: Sequence[TargetView],
    tried: frozenset[int],
    now: float,
    deadline: float | None,
    timeout_s: float,
    config: BreakerConfig,
) -> Attempt | None:
    """The next attempt for a request, or None when none is left (every target tried, or no time left).

    `deadline` is when the caller's budget ends (None: no budget; each attempt then waits `timeout_s`).
    """
    remaining = math.inf if deadline is None else deadline - now
    if remaining < MIN_ATTEMPT_S:
        return None
    untried = [i for i in range(len(targets)) if i not in tried]
    viable = [i for i in untried if _viable(targets[i], now, config)]
    for position, index in enumerate(viable):
        expected = targets[index].latency_s
        if deadline is not None and expected is not None and expected > remaining and position + 1 < len(viable):
            continue  # usually slower than the time left, and another target may make it
        reserve = 0.0
        if deadline is not None and position + 1 < len(viable):
            fallback = targets[viable[position + 1]].latency_s
            reserve = FALLBACK_MARGIN * fallback if fallback is not None else 0.0
        wait = min(timeout_s, remaining - reserve)
        if wait < MIN_ATTEMPT_S:
            if position + 1 < len(viable):
                continue  # waiting here would leave the next target no time: go there instead
            wait = min(timeout_s, remaining)
        return Attempt(index, wait)
    if untried:
        return Attempt(untried[0], min(timeout_s, remaining), last_resort=True)
    return None


class Verdict(enum.Enum):
    """What an answer from a target means for the request."""

    ANSWERED = "answered"  # 2xx: hand it to the caller
    REFUSED = "refused"  # 429/503: the target sheds load or is not ready; try the next tier
    MISSING = "missing"  # 404: the target does not serve this model; try the next tier
    CALLER_ERROR = "caller_error"  # other 4xx: the request itself is wrong; every tier would say so
    FAILED = "failed"  # no answer, or a server error: try the next tier, and count it against the target


def classify(status: int | None) -> Verdict:
    """The verdict on an attempt that got `status` (None: no HTTP answer: refused, reset, timed out)."""
    if status is None or (status >= 500 and status != 503):
        return Verdict.FAILED
    if 200 <= status < 300:
        return Verdict.ANSWERED
    if status in (429, 503):
        return Verdict.REFUSED
    if status == 404:
        return Verdict.MISSING
    if 400 <= status < 500:
        return Verdict.CALLER_ERROR
    return Verdict.FAILED  # 1xx and 3xx: not an answer an inference client can use


def counts_against(verdict: Verdict) -> bool:
    """Whether a verdict is a failure of the target (for its breaker)."""
    return verdict is Verdict.FAILED
