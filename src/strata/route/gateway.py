"""`strata gateway`: a local Open Inference Protocol endpoint that sends each request down the tiers.

Applications on a device talk to the gateway as to any OIP server (`/v2/...`, JSON or binary tensors, Triton
clients unchanged); the gateway's `Router` tries the node's own agent, then its parent near-edge node, then
the cloud, and answers with the first tier's answer plus `Strata-Served-By: local|parent|cloud` and
`Strata-Route` (every attempt, in order). A request may state its latency budget in `Strata-Budget-Ms`.

Targets come from the command line, or from the control plane's topology of this node, refreshed every
`topology_interval_s`; the last topology is kept while the control plane is away. With `--data-dir` (the node
agent's data folder) the gateway acts as the node: it reads the topology with the node's fleet certificate and
reaches its parents' tier listeners over mutual TLS (reloading the certificate when the agent renews it). An
operator may instead give `--server --node --token` (and `--ca`), which reaches parents only over plain HTTP.
The gateway's own routes: `/v2/health/live`, `/v2/health/ready` (ready while some target is) and `/metrics`.

It reuses two generic modules of the agent, its lean HTTP server (`strata.agent.httpd`) and its Prometheus
text registry (`strata.agent.metrics`); nothing of the agent's state, store or runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import quote, urlencode

from strata.agent.httpd import HttpServer, Request, Response
from strata.agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from strata.agent.metrics import MetricsRegistry
from strata.core.errors import ConfigError, StrataError
from strata.route.policy import Verdict
from strata.route.router import BUDGET, ROUTE, SERVED_BY, AttemptRecord, Router, RouterConfig, Target
from strata.route.topology import Topology, fetch_topology
from strata.trust.fleet_tls import NodeTrust

log = logging.getLogger("strata.gateway")

_BREAKER_LEVEL: Final = {"closed": 0, "half_open": 1, "open": 2}
_TOPOLOGY_RETRY_S: Final = 5.0  # after a failed read, the topology is read again this soon


@dataclass(frozen=True)
class GatewayConfig:
    """Everything `strata gateway` was told.

    Attributes:
        local, parents, cloud: targets given by hand (URLs); with a control plane they come after its own.
        data_dir: the node agent's data folder: act as the node (its id, control plane and fleet certificate).
        server, node_id, token: read a node's topology from the control plane as an operator (admin or read
            token); `ca` is the fleet CA the control plane's certificate is checked against.
        topology_interval_s: how often the topology is read again.
    """

    host: str = "127.0.0.1"
    port: int = 8090
    local: str | None = None
    parents: tuple[str, ...] = ()
    cloud: tuple[str, ...] = ()
    server: str | None = None
    node_id: str | None = None
    token: str | None = None
    data_dir: Path | None = None
    ca: Path | None = None
    topology_interval_s: float = 30.0
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        """Raises:
        ConfigError: no target and no control plane, a control plane without node or token, or a bad URL.
        """
        if self.data_dir is None and self.server is not None and (not self.node_id or not self.token):
            raise ConfigError("--server needs --node and --token (an operator token), or --data-dir (the node's own)")
        if self.server is None and self.data_dir is None and not (self.local or self.parents or self.cloud):
            raise ConfigError(
                "give the gateway somewhere to send requests: --local/--parent/--cloud, --data-dir or --server"
            )
        if self.topology_interval_s <= 0:
            raise ConfigError("--topology-interval must be positive")
        self.manual_targets()  # checks the URLs

    def manual_targets(self, fleet_tls: ssl.SSLContext | None = None) -> list[Target]:
        """The targets given by hand, in tier order (https parents over `fleet_tls`).

        Raises:
            ConfigError: a URL is not http(s).
        """
        return Topology("", "", "", None, (), ()).targets(self.local, self.parents, self.cloud, fleet_tls)


class GatewayTls:
    """The TLS contexts the gateway uses: as the node (from its trust folder, reloaded when the agent renews its
    certificate), or, for an operator, one that trusts the fleet CA given by `--ca`."""

    def __init__(self, config: GatewayConfig) -> None:
        """Raises:
        ConfigError: the node's trust folder or the CA file does not load.
        """
        self.trust = NodeTrust.load(config.data_dir) if config.data_dir is not None else None
        self._stamp: tuple[float, ...] | None = None
        self.api: ssl.SSLContext | None = None
        self.peers: ssl.SSLContext | None = None
        if self.trust is None and config.ca is not None:
            try:
                self.api = ssl.create_default_context(cafile=config.ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"the CA file {config.ca} does not load: {exc}") from exc
        self.refresh()

    def refresh(self) -> bool:
        """Reload the node's contexts when its certificate files changed; True when they did.

        Raises:
            ConfigError: the files no longer load.
        """
        if self.trust is None or self.trust.stamp == self._stamp:
            return False
        self.api, self.peers = self.trust.client_context(), self.trust.peer_context()
        self._stamp = self.trust.stamp
        return True


class Gateway:
    """The gateway's HTTP handler (`strata.agent.httpd.Handler`) over a `Router`."""

    def __init__(self, router: Router, registry: MetricsRegistry | None = None) -> None:
        self.router = router
        self.registry = registry or MetricsRegistry()
        self._requests = self.registry.counter(
            "strata_gateway_requests_total", "Requests the gateway answered, by the tier that served them", ["tier"]
        )
        self._attempts = self.registry.counter(
            "strata_gateway_attempts_total", "Attempts sent to targets, by tier and verdict", ["tier", "verdict"]
        )
        self._breakers = self.registry.gauge(
            "strata_gateway_breaker_state", "Each target's breaker: 0 closed, 1 half-open, 2 open", ["tier", "target"]
        )
        router.on_attempt = self._count_attempt

    def _count_attempt(self, record: AttemptRecord, verdict: Verdict) -> None:
        self._attempts.inc(record.tier, verdict.value)

    async def handle(self, request: Request) -> Response:
        """Answer one request: the gateway's own routes, or any `/v2` route forwarded down the tiers."""
        parts = tuple(request.path.strip("/").split("/"))
        if parts == ("v2", "health", "live"):
            return Response.json(200, {"live": True})
        if parts == ("v2", "health", "ready"):
            if self.router.any_ready:
                return Response.json(200, {"ready": True})
            return Response.error(503, "no tier is ready")
        if parts == ("metrics",):
            self._breakers.replace(
                {(s["tier"], s["target"]): _BREAKER_LEVEL[s["breaker"]] for s in self.router.status()}
            )
            return Response(200, {"content-type": METRICS_CONTENT_TYPE}, self.registry.render().encode())
        if parts[0] != "v2":
            return Response.error(404, f"no route for {request.method} {request.path}")
        budget_s = None
        raw_budget = request.headers.get(BUDGET)
        if raw_budget is not None:
            try:
                budget_s = float(raw_budget) / 1000
            except ValueError:
                budget_s = -1.0
            if not budget_s > 0:
                return Response.error(400, f"{BUDGET} must be a positive number of milliseconds, got {raw_budget!r}")
        model = parts[2] if len(parts) >= 3 and parts[1] == "models" else None
        path = "/" + "/".join(quote(part, safe="") for part in parts)
        if request.query:
            path += "?" + urlencode(request.query)
        routed = await self.router.send(
            request.method, path, model=model, body=request.body, headers=request.headers, budget_s=budget_s
        )
        headers = dict(routed.headers)
        headers[SERVED_BY] = routed.served_by or "none"
        headers[ROUTE] = ", ".join(str(a) for a in routed.attempts) or "none"
        self._requests.inc(routed.served_by or "none")
        return Response(routed.status, headers, routed.body)


async def _refresh_topology(config: GatewayConfig, tls: GatewayTls, router: Router, stop: asyncio.Event) -> None:
    """Read this node's topology now and every `topology_interval_s`; keep the last one on failure."""
    trust = tls.trust
    server = config.server or (trust.server if trust is not None else None)
    node_id = config.node_id or (trust.node_id if trust is not None else None)
    token = None if trust is not None else config.token
    if server is None or node_id is None:
        return
    topology: Topology | None = None
    while not stop.is_set():
        interval = config.topology_interval_s
        try:
            renewed = tls.refresh()
            if renewed and topology is not None:
                log.info("this node's certificate changed; reconnecting to the other tiers with it")
            topology = await fetch_topology(server, node_id, token, tls=tls.api)
        except StrataError as exc:
            log.warning("cannot read this node's topology (%s); routing over %s", exc, _describe(router.targets))
            interval = min(interval, _TOPOLOGY_RETRY_S)
        else:
            targets = topology.targets(config.local, config.parents, config.cloud, tls.peers)
            if targets != router.targets:
                log.info("routing over %s", _describe(targets))
                router.set_targets(targets)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


def _describe(targets: list[Target]) -> str:
    return ", ".join(f"{t.tier} {t.url}" for t in targets) or "no targets"


async def serve_gateway(config: GatewayConfig, stop: asyncio.Event) -> None:
    """Run the gateway until `stop` is set.

    Raises:
        ConfigError: the listening address cannot be bound.
    """
    tls = GatewayTls(config)
    router = Router(config.manual_targets(tls.peers), config.router)
    gateway = Gateway(router)
    server = HttpServer(gateway.handle)
    await server.start(config.host, config.port)
    log.info("gateway listening on http://%s:%d", config.host, server.port)
    router.start()
    refresher = None
    if config.server is not None or tls.trust is not None:
        if tls.trust is not None:
            log.info("acting as node %s (its fleet certificate) toward %s", tls.trust.node_id, tls.trust.server)
        refresher = asyncio.create_task(_refresh_topology(config, tls, router, stop))
    else:
        log.info("routing over %s", _describe(router.targets))
    try:
        await stop.wait()
    finally:
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await server.stop()
        await router.close()


def run(config: GatewayConfig) -> int:
    """Run the gateway in this process until SIGTERM or SIGINT; return the exit code."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve_gateway(config, stop)

    try:
        asyncio.run(main())
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("gateway stopped")
    return 0
