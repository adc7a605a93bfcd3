"""A circuit breaker per routing target: pure state transitions, with `now` passed in.

Closed: requests go through; `failure_threshold` failures in a row open it. Open: no request goes until
`cooldown_s` has passed; then it is half-open. Half-open: one request at a time probes the target; a success
closes the breaker, a failure opens it again for another cool-down. A target that sheds load (429/503) or does
not serve a model has not failed: those answers count as successes here (the target is up and saying so).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from strata.core.errors import ConfigError


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """When a breaker opens, and how long it stays open."""

    failure_threshold: int = 3
    cooldown_s: float = 5.0

    def __post_init__(self) -> None:
        """Raises:
        ConfigError: a setting is out of range.
        """
        if self.failure_threshold < 1:
            raise ConfigError(f"the breaker's failure threshold must be at least 1, got {self.failure_threshold}")
        if self.cooldown_s <= 0:
            raise ConfigError(f"the breaker's cool-down must be positive, got {self.cooldown_s}")


@dataclass(frozen=True)
class Breaker:
    """One target's breaker. `probing`: a half-open trial request is in flight."""

    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def allows(self, now: float, config: BreakerConfig) -> bool:
        """Whether a request may be sent to the target now."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            return now - self.opened_at >= config.cooldown_s
        return not self.probing

    def attempt(self, now: float, config: BreakerConfig) -> Breaker:
        """The breaker once a request is sent (an open breaker past its cool-down turns half-open and probes)."""
        if self.state is BreakerState.CLOSED:
            return self
        return replace(self, state=BreakerState.HALF_OPEN, probing=True)

    def succeeded(self) -> Breaker:
        """The target answered: closed, failures forgotten."""
        return Breaker()

    def failed(self, now: float, config: BreakerConfig) -> Breaker:
        """The target failed (no answer, or a server error): count it, open at the threshold; a failed probe
        reopens at once."""
        if self.state is BreakerState.HALF_OPEN:
            return Breaker(BreakerState.OPEN, self.failures + 1, now)
        failures = self.failures + 1
        if self.state is BreakerState.OPEN or failures >= config.failure_threshold:
            return Breaker(BreakerState.OPEN, failures, now if self.state is BreakerState.CLOSED else self.opened_at)
        return Breaker(BreakerState.CLOSED, failures)

    def released(self) -> Breaker:
        """A probe ended without a verdict (the request was cancelled): let the next request probe."""
        return replace(self, probing=False)
