"""The agent's configuration: one typed object with every setting and limit (like TUF's UpdaterConfig)."""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from strata.core.errors import ConfigError
from strata.core.package import check_name
from strata.core.wire import TIERS, parse_labels

CONFIG_ENV: Final = "STRATA_AGENT_CONFIG"


@dataclass(frozen=True)
class AgentConfig:
    """Everything `strata agent` was told. Limits are in seconds and bytes."""

    server: str
    data_dir: Path
    name: str
    tier: str
    labels: dict[str, str] = field(default_factory=dict)
    enroll_token: str | None = None
    serve_host: str = "127.0.0.1"
    serve_port: int = 8080
    profile: str | None = None
    poll_wait_s: float = 30.0
    request_timeout_s: float = 30.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0
    max_download_rate: int | None = None
    inference_threads: int | None = None
    log_level: str = "info"
    probation_s: float = 60.0
    report_interval_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.server.startswith(("http://", "https://")):
            raise ConfigError(f"--server must be an http:// or https:// URL, got {self.server!r}")
        check_name("node name", self.name)
        if self.tier not in TIERS:
            raise ConfigError(f"--tier must be one of {', '.join(TIERS)}, got {self.tier!r}")
        parse_labels(self.labels)
        if not 0 <= self.serve_port <= 65535:
            raise ConfigError(f"--serve-port {self.serve_port} is not a port")
        if self.max_download_rate is not None and self.max_download_rate <= 0:
            raise ConfigError("--max-download-rate must be positive")
        if self.poll_wait_s < 0 or self.poll_wait_s > 60:
            raise ConfigError("the poll wait must be between 0 and 60 seconds")
        if self.probation_s < 0:
            raise ConfigError("--probation must not be negative (0 turns it off)")
        if self.report_interval_s < 0:
            raise ConfigError("--report-interval must not be negative")

    @property
    def serve_is_loopback(self) -> bool:
        """True when the inference API is reachable only from this machine."""
        if self.serve_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.serve_host).is_loopback
        except ValueError:
            return False

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "data_dir": str(self.data_dir),
            "name": self.name,
            "tier": self.tier,
            "labels": self.labels,
            "enroll_token": self.enroll_token,
            "serve_host": self.serve_host,
            "serve_port": self.serve_port,
            "profile": self.profile,
            "poll_wait_s": self.poll_wait_s,
            "request_timeout_s": self.request_timeout_s,
            "backoff_min_s": self.backoff_min_s,
            "backoff_max_s": self.backoff_max_s,
            "max_download_rate": self.max_download_rate,
            "inference_threads": self.inference_threads,
            "log_level": self.log_level,
            "probation_s": self.probation_s,
            "report_interval_s": self.report_interval_s,
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
