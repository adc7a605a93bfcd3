"""The agent's configuration: one typed object with every setting and limit (like TUF's UpdaterConfig)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from strata.agent.batch_plan import BatchingConfig
from strata.core.errors import ConfigError
from strata.core.logformat import check_log_format, check_log_level
from strata.core.package import check_name
from strata.core.wire import TIERS, parse_labels

EVENT_LOOPS = ("uvloop", "asyncio")

CONFIG_ENV: Final = "STRATA_AGENT_CONFIG"
GRPC_DEFAULT_MESSAGE_MB: Final = 4.0  # gRPC's own default largest message (grpc.max_receive_message_length)


GOLDEN_TIMEOUT_S: Final = 300.0
"""How long a version's golden check may run before the version fails (`--golden-timeout`): a model that never
ends (a Loop whose trip count is 10^15) held the agent's reconciler, and a core, for good."""


@dataclass(frozen=True)
class AgentConfig:
    """Everything `strata agent` was told. Limits are in seconds and bytes."""

    server: str
    data_dir: Path
    name: str
    tier: str
    labels: dict[str, str] = field(default_factory=dict)
    enroll_token: str | None = None
    replace: bool = False  # enroll even when the name is taken: re-key that node (with a re-enrollment token)
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    grpc_port: int | None = None  # the Open Inference Protocol over gRPC too, on the serve host (off: None)
    profile: str | None = None
    poll_wait_s: float = 30.0
    request_timeout_s: float = 30.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    max_download_rate: int | None = None
    inference_threads: int | None = None
    serve_processes: int | None = None
    event_loop: str | None = None  # "uvloop" or "asyncio"; None: by tier (`serving_loop`)
    log_level: str = "info"
    log_format: str = "text"  # or json (`strata.core.logformat`)
    telemetry_budget_mb: float = 64.0
    telemetry_sample_rate: float = 0.01
    telemetry_slow_ms: float = 250.0
    telemetry_interval_s: float = 10.0
    relays: tuple[str, ...] = ()
    relay_cache_mb: float | None = None
    probation_s: float = 60.0
    golden_timeout_s: float = GOLDEN_TIMEOUT_S
    renew_before_s: float = 8 * 3600.0
    tier_port: int | None = None
    tier_host: str | None = None
    report_interval_s: float = 60.0
    encrypt_at_rest: bool = True
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    max_queue_wait_ms: float | None = 5000.0
    model_instances: int = 2
    tpm: str | None = None
    # what callers of the inference port and the tier port may hold (see strata.agent.httpd.ServerLimits)
    max_request_mb: float = 64.0
    request_budget_mb: float = 128.0
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    grpc_max_message_mb: float | None = None  # None: gRPC's own default, 4 MiB (or what the limits above allow)

    def __post_init__(self) -> None:
        for item in fields(self):  # NaN passes every comparison below, infinity most; either fails later as bytes
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                flag = "--" + item.name.removesuffix("_s").replace("_", "-")
                raise ConfigError(f"{flag} must be a finite number, got {value}")
        if not self.server.startswith("https://"):
            raise ConfigError(
                f"--server must be an https:// URL (the control plane speaks only TLS), got {self.server!r}"
            )
        check_name("node name", self.name, ConfigError)
        if self.tier not in TIERS:
            raise ConfigError(f"--tier must be one of {', '.join(TIERS)}, got {self.tier!r}")
        if self.event_loop is not None and self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        parse_labels(self.labels)
        check_log_format(self.log_format)
        check_log_level(self.log_level)
        if not 0 <= self.serve_port <= 65535:
            raise ConfigError(f"--serve-port {self.serve_port} is not a port")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ConfigError(f"--grpc-port {self.grpc_port} is not a port")
        if self.max_download_rate is not None and self.max_download_rate <= 0:
            raise ConfigError("--max-download-rate must be positive")
        if self.poll_wait_s < 0 or self.poll_wait_s > 60:
            raise ConfigError("the poll wait must be between 0 and 60 seconds")
        if not 0 <= self.telemetry_sample_rate <= 1:
            raise ConfigError("--telemetry-sample-rate must be between 0 and 1")
        if self.telemetry_budget_mb < 1:
            raise ConfigError("--telemetry-budget-mb must be at least 1")
        for relay in self.relays:
            if not relay.startswith(("http://", "https://")):
                raise ConfigError(f"--relay must be an http:// or https:// URL, got {relay!r}")
        if self.relay_cache_mb is not None and self.relay_cache_mb < 0:
            raise ConfigError("--relay-cache-mb must not be negative")
        if self.telemetry_interval_s <= 0 or self.telemetry_slow_ms <= 0:
            raise ConfigError("telemetry interval and slow threshold must be positive")
        if self.probation_s < 0:
            raise ConfigError("--probation must not be negative (0 turns it off)")
        if not 1 <= self.golden_timeout_s <= 86400:
            raise ConfigError("--golden-timeout must be between 1s and 24h")
        if self.report_interval_s < 0:
            raise ConfigError("--report-interval must not be negative")
        if not 1 <= self.request_timeout_s <= 600:
            raise ConfigError("--request-timeout must be between 1s and 10m")
        if self.max_request_mb <= 0 or self.request_budget_mb < self.max_request_mb:
            raise ConfigError("--max-request-mb must be positive and at most --request-budget-mb")
        if self.grpc_max_message_mb is not None and not (
            0 < self.grpc_max_message_mb <= self.max_request_mb
            and self.grpc_max_message_mb <= self.request_budget_mb / 2
        ):
            raise ConfigError(
                "--grpc-max-message-mb must be positive, at most --max-request-mb, and at most half of "
                "--request-budget-mb (the budget keeps one message's worth for health and metadata calls)"
            )
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        if not 0 < self.header_timeout_s <= self.body_timeout_s:
            raise ConfigError("--header-timeout must be positive and at most --body-timeout")
        object.__setattr__(self, "preferred_batch_sizes", tuple(self.preferred_batch_sizes))
        _ = self.batching  # building it checks the batching settings

    @property
    def relay_budget_bytes(self) -> int:
        """The relay cache's budget: 2 GiB on near-edge nodes unless set; no relay elsewhere unless set."""
        megabytes = (
            self.relay_cache_mb if self.relay_cache_mb is not None else (2048 if self.tier == "near-edge" else 0)
        )
        return int(megabytes * (1 << 20))

    @property
    def max_request_bytes(self) -> int:
        """The largest request body either listener reads (and the largest a compressed one may inflate to)."""
        return int(self.max_request_mb * (1 << 20))

    @property
    def request_budget_bytes(self) -> int:
        """The request bodies all connections of one listener may hold at once."""
        return int(self.request_budget_mb * (1 << 20))

    @property
    def grpc_max_message_bytes(self) -> int:
        """The largest message of a gRPC call: --grpc-max-message-mb, else gRPC's own default of 4 MiB, or less
        when --max-request-mb or half of --request-budget-mb is (`strata.agent.oip_grpc` says why half)."""
        megabytes = self.grpc_max_message_mb
        if megabytes is None:
            megabytes = min(GRPC_DEFAULT_MESSAGE_MB, self.max_request_mb, self.request_budget_mb / 2)
        return int(megabytes * (1 << 20))

    @property
    def serving_loop(self) -> str:
        """The serving processes' event loop: --event-loop, else asyncio's own on devices (uvloop's library costs
        1.4 MB resident, and a device keeps its memory budget, as it keeps one serving process) and uvloop on the
        other tiers (+12% requests per second on a small model)."""
        if self.event_loop is not None:
            return self.event_loop
        return "asyncio" if self.tier == "device" else "uvloop"

    @property
    def serve_host_tier(self) -> str:
        """Where the mutual-TLS tier listener binds: --tier-host, else the serve host."""
        return self.tier_host or self.serve_host

    @property
    def batching(self) -> BatchingConfig:
        """The batching and queueing settings every model gets unless its package overrides them.

        Raises:
            ConfigError: a setting is out of range.
        """
        return BatchingConfig(
            max_batch_size=self.max_batch_size,
            max_queue_delay_us=self.max_queue_delay_us,
            preferred_batch_sizes=self.preferred_batch_sizes,
            max_queue_size=self.max_queue_size,
            max_queue_wait_ms=self.max_queue_wait_ms,
            instances=self.model_instances,
        )

    @property
    def serve_is_loopback(self) -> bool:
        """True when the inference API is reachable only from this machine."""
        # By hand rather than with ipaddress: the agent counts every module it loads against its memory budget.
        host = self.serve_host.strip("[]").lower()
        return host in ("localhost", "::1") or (host.startswith("127.") and host.replace(".", "").isdigit())

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "data_dir": str(self.data_dir),
            "name": self.name,
            "tier": self.tier,
            "labels": self.labels,
            "enroll_token": self.enroll_token,
            "replace": self.replace,
            "serve_host": self.serve_host,
            "serve_port": self.serve_port,
            "grpc_port": self.grpc_port,
            "profile": self.profile,
            "poll_wait_s": self.poll_wait_s,
            "request_timeout_s": self.request_timeout_s,
            "backoff_min_s": self.backoff_min_s,
            "backoff_max_s": self.backoff_max_s,
            "max_download_rate": self.max_download_rate,
            "inference_threads": self.inference_threads,
            "serve_processes": self.serve_processes,
            "event_loop": self.event_loop,
            "log_level": self.log_level,
            "log_format": self.log_format,
            "telemetry_budget_mb": self.telemetry_budget_mb,
            "telemetry_sample_rate": self.telemetry_sample_rate,
            "telemetry_slow_ms": self.telemetry_slow_ms,
            "telemetry_interval_s": self.telemetry_interval_s,
            "relays": list(self.relays),
            "relay_cache_mb": self.relay_cache_mb,
            "probation_s": self.probation_s,
            "golden_timeout_s": self.golden_timeout_s,
            "renew_before_s": self.renew_before_s,
            "tier_port": self.tier_port,
            "tier_host": self.tier_host,
            "report_interval_s": self.report_interval_s,
            "encrypt_at_rest": self.encrypt_at_rest,
            "max_batch_size": self.max_batch_size,
            "max_queue_delay_us": self.max_queue_delay_us,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_size": self.max_queue_size,
            "max_queue_wait_ms": self.max_queue_wait_ms,
            "model_instances": self.model_instances,
            "tpm": self.tpm,
            "max_request_mb": self.max_request_mb,
            "request_budget_mb": self.request_budget_mb,
            "max_connections": self.max_connections,
            "header_timeout_s": self.header_timeout_s,
            "body_timeout_s": self.body_timeout_s,
            "grpc_max_message_mb": self.grpc_max_message_mb,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> AgentConfig:
        """Raises:
        ConfigError: a setting is missing or out of range.
        """
        try:
            values = dict(raw)
            values["data_dir"] = Path(values["data_dir"])
            values["labels"] = dict(values.get("labels") or {})
            values["relays"] = tuple(values.get("relays") or ())
            values["preferred_batch_sizes"] = tuple(values.get("preferred_batch_sizes") or ())
            return cls(**values)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"agent configuration is incomplete or malformed: {exc}") from exc

    def to_env(self) -> str:
        return json.dumps(self.to_json())

    @classmethod
    def from_env(cls) -> AgentConfig:
        """Read the configuration `strata agent` hands to the agent process.

        Raises:
            ConfigError: the variable is missing or malformed.
        """
        text = os.environ.get(CONFIG_ENV)
        if not text:
            raise ConfigError(f"{CONFIG_ENV} is not set; start the agent with `strata agent`")
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{CONFIG_ENV} is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{CONFIG_ENV} must be a JSON object")
        return cls.from_json(raw)
