"""`strata gateway`: a local Open Inference Protocol endpoint that sends each request down the tiers.

Applications on a device talk to the gateway as to any OIP server (`/v2/...`, JSON or binary tensors, Triton
clients unchanged); the gateway's `Router` tries the node's own agent, then its parent near-edge node, then
the cloud, and answers with the first tier's answer plus `Strata-Served-By: local|parent|cloud` and
`Strata-Route` (every attempt, in order). A request may state its latency budget in `Strata-Budget-Ms`.

Targets come from the command line, or from the control plane's topology of this node, refreshed every
`topology_interval_s`; the last topology is kept while the control plane is away. With `--data-dir` (the node
agent's data folder) the gateway acts as the node: it reads the topology with the node's fleet certificate and
reaches its own tier listener and its parents' over mutual TLS, each checked to be the node the topology named
and not revoked by the fleet (the revocation list of the node's saved desired state, `desired.json`); it
reconnects within a second when the agent renews the certificate or saves a new revocation list. An operator
may instead give `--server --node --token` (and `--ca`): without a node certificate, the fleet nodes of the
topology are left out (configured cloud endpoints and URLs given by hand remain).

Only the Open Inference Protocol routes of `strata.route.oip_routes` are forwarded, on a path rebuilt from the
parts matched, without query string or the caller's credentials; anything else is answered 404 or 405. The
gateway's own routes: `/v2/health/live`, `/v2/health/ready` (ready while some target is) and `/metrics`.

It reuses two generic modules of the agent, its lean HTTP server (`strata.agent.httpd`) and its Prometheus
text registry (`strata.agent.metrics`); nothing of the agent's state, store or runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from strata.agent.httpd import HttpServer, Request, Response
from strata.agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from strata.agent.metrics import MetricsRegistry
from strata.core.aio import wait_any, wait_event
from strata.core.errors import ConfigError, StrataError
from strata.route.oip_routes import LIVE, METRICS, READY, RouteRefusal, match_route
from strata.route.peer import PeerTls, RevocationList, node_checked
from strata.route.route_plan import Verdict
from strata.route.router import (
    BUDGET,
    MAX_BUDGET_MS,
    ROUTE,
    SERVED_BY,
    AttemptRecord,
    Router,
    RouterConfig,
    Target,
)
from strata.route.topology import Topology, fetch_topology
from strata.trust.fleet_tls import NodeTrust

log = logging.getLogger("strata.gateway")

_BREAKER_LEVEL: Final = {"closed": 0, "half_open": 1, "open": 2}
_FIRST_TOPOLOGY_WAIT_S: Final = 10.0  # the gateway listens after its first topology read, or after this long
_TOPOLOGY_RETRY_S: Final = 5.0  # after a failed read, the topology is read again this soon
_TLS_CHECK_S: Final = 1.0  # how often the node's certificate files and revocation list are looked at


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

    def manual_targets(self, peer_tls: PeerTls | None = None, node_id: str = "") -> list[Target]:
        """The targets given by hand, in tier order (https parents over the fleet chain of `peer_tls`, and an
        https local URL checked to be node `node_id`).

        Raises:
            ConfigError: a URL is not http(s).
        """
        return Topology(node_id, "", "", None, (), ()).targets(self.local, self.parents, self.cloud, peer_tls)


class GatewayTls:
    """The TLS contexts the gateway uses: as the node (from its trust folder, reloaded when the agent renews its
    certificate, and refusing peers the fleet revoked), or, for an operator, one that trusts the fleet CA given
    by `--ca`."""

    def __init__(self, config: GatewayConfig) -> None:
        """Raises:
        ConfigError: the node's trust folder or the CA file does not load.
        """
        self.trust = NodeTrust.load(config.data_dir) if config.data_dir is not None else None
        self.revoked = RevocationList(config.data_dir / "desired.json") if config.data_dir is not None else None
        self._stamp: tuple[float, ...] | None = None
        self._revoked_seen: frozenset[str] | None = None
        self.api: ssl.SSLContext | None = None
        self._peers: dict[str | None, ssl.SSLContext] = {}
        if self.trust is None and config.ca is not None:
            try:
                self.api = ssl.create_default_context(cafile=config.ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"the CA file {config.ca} does not load: {exc}") from exc
        self.refresh()

    def refresh(self) -> bool:
        """Make the node's contexts anew when its certificate files or the fleet's revocation list changed (new
        contexts: the router opens new connections, each checked again); True when they did.

        Raises:
            ConfigError: the files no longer load.
        """
        if self.trust is None or self.revoked is None:
            return False
        revoked = self.revoked()
        if self.trust.stamp == self._stamp and revoked == self._revoked_seen:
            return False
        self.api = self.trust.client_context()
        # loads the files now: a damaged one fails here
        self._peers = {None: node_checked(self.trust.peer_context(), None, self.revoked)}
        self._stamp = self.trust.stamp
        self._revoked_seen = revoked
        return True

    @property
    def peers(self) -> PeerTls | None:
        """The node's contexts toward other nodes (`peer`), or None when the gateway does not act as a node."""
        return self.peer if self.trust is not None else None

    def peer(self, node_id: str | None) -> ssl.SSLContext:
        """The context toward fleet node `node_id` (its certificate must name it), or toward any fleet node (None);
        one per node until the certificate is renewed, so the router keeps its connections.

        Raises:
            ConfigError: the gateway does not act as a node, or the node's files no longer load.
        """
        if self.trust is None:
            raise ConfigError("reaching fleet nodes over mutual TLS needs the node's data folder (--data-dir)")
        context = self._peers.get(node_id)
        if context is None:
            context = self._peers[node_id] = node_checked(self.trust.peer_context(), node_id or None, self.revoked)
        return context


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
        """Answer one request: the gateway's own routes, or an Open Inference Protocol route forwarded down the
        tiers (`strata.route.oip_routes`); anything else 404, or 405 on a known route."""
        route = match_route(request.method, request.path)
        if isinstance(route, RouteRefusal):
            headers = {"allow": route.allow} if route.allow else None
            return Response.error(route.status, f"{route.reason}: {request.method} {request.path!r}", headers)
        if route.kind == LIVE:
            return Response.json(200, {"live": True})
        if route.kind == READY:
            if self.router.any_ready:
                return Response.json(200, {"ready": True})
            return Response.error(503, "no tier is ready")
        if route.kind == METRICS:
            self._breakers.replace(
                {(s["tier"], s["target"]): _BREAKER_LEVEL[s["breaker"]] for s in self.router.status()}
            )
            return Response(200, {"content-type": METRICS_CONTENT_TYPE}, self.registry.render().encode())
        budget_s = None
        raw_budget = request.headers.get(BUDGET)
        if raw_budget is not None:
            budget_ms = parse_budget_ms(raw_budget)
            if budget_ms is None:
                return Response.error(
                    400,
                    f"{BUDGET} must be a number of milliseconds from 1 to {MAX_BUDGET_MS:.0f}, got {raw_budget[:40]!r}",
                )
            budget_s = budget_ms / 1000
        # the path is rebuilt from the parts matched; no query string; a body only where the protocol has one
        body = request.body if route.method == "POST" else b""
        routed = await self.router.send(
            route.method, route.path, model=route.model, body=body, headers=request.headers, budget_s=budget_s
        )
        headers = dict(routed.headers)
        headers[SERVED_BY] = routed.served_by or "none"
        headers[ROUTE] = ", ".join(str(a) for a in routed.attempts) or "none"
        self._requests.inc(routed.served_by or "none")
        return Response(routed.status, headers, routed.body)


def parse_budget_ms(raw: str) -> float | None:
    """A `Strata-Budget-Ms` value in milliseconds, or None unless it is a finite number from 1 to 600000."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 1 <= value <= MAX_BUDGET_MS else None  # NaN and infinities fail the comparison


async def _refresh_topology(
    config: GatewayConfig, tls: GatewayTls, router: Router, stop: asyncio.Event, first_read: asyncio.Event
) -> None:
    """Read this node's topology now and every `topology_interval_s` (keeping the last one on failure), and look
    at the node's certificate and revocation list every second: when they change, route over new contexts.
    `first_read` is set once the first read was tried (and its routes set, when it succeeded)."""
    trust = tls.trust
    server = config.server or (trust.server if trust is not None else None)
    node_id = config.node_id or (trust.node_id if trust is not None else None)
    token = None if trust is not None else config.token
    loop = asyncio.get_running_loop()
    topology: Topology | None = None
    next_read = loop.time() if server is not None and node_id is not None else math.inf
    while not stop.is_set():
        replan = False
        try:
            if tls.refresh():
                log.info("this node's certificate or the fleet's revocation list changed; reconnecting to the tiers")
                replan = True
        except StrataError as exc:
            log.warning("cannot reload this node's certificate (%s); keeping the one loaded", exc)
        if loop.time() >= next_read and server is not None and node_id is not None:
            try:
                topology = await fetch_topology(server, node_id, token, tls=tls.api)
            except StrataError as exc:
                log.warning("cannot read this node's topology (%s); routing over %s", exc, _describe(router.targets))
                next_read = loop.time() + min(config.topology_interval_s, _TOPOLOGY_RETRY_S)
            else:
                next_read = loop.time() + config.topology_interval_s
                replan = True
        if replan:
            if topology is not None:
                targets, refused = topology.plan(config.local, config.parents, config.cloud, tls.peers)
            else:
                targets, refused = config.manual_targets(tls.peers, trust.node_id if trust else ""), []
            if targets != router.targets:
                for reason in refused:
                    log.warning("left out of the routes: %s", reason)
                log.info("routing over %s", _describe(targets))
                router.set_targets(targets)
        first_read.set()
        wait = min(_TLS_CHECK_S if trust is not None else math.inf, next_read - loop.time())
        await wait_event(stop, wait)


def _describe(targets: list[Target]) -> str:
    return ", ".join(f"{t.tier} {t.url}" for t in targets) or "no targets"


async def serve_gateway(config: GatewayConfig, stop: asyncio.Event) -> None:
    """Run the gateway until `stop` is set. Set while the first topology read is under way (a signal during
    startup), the gateway never listens: it stops at once instead of when the read ends.

    Raises:
        ConfigError: the listening address cannot be bound.
    """
    tls = GatewayTls(config)
    node_id = tls.trust.node_id if tls.trust is not None else ""
    router = Router(config.manual_targets(tls.peers, node_id), config.router)
    gateway = Gateway(router)
    server = HttpServer(gateway.handle)
    refresher = None
    try:
        if config.server is not None or tls.trust is not None:
            if tls.trust is not None:
                log.info("acting as node %s (its fleet certificate) toward %s", tls.trust.node_id, tls.trust.server)
            # Listen once the topology was read (or could not be, within a few seconds): a request that came
            # before would find no route at all (`strata-served-by: none`) where the node's own agent was there to
            # answer.
            first_read = asyncio.Event()
            refresher = asyncio.create_task(_refresh_topology(config, tls, router, stop, first_read))
            await wait_any((first_read, stop), _FIRST_TOPOLOGY_WAIT_S)
        else:
            log.info("routing over %s", _describe(router.targets))
        if stop.is_set():
            return
        await server.start(config.host, config.port)
        log.info("gateway listening on http://%s:%d", config.host, server.port)
        router.start()
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

        def on_signal(signum: signal.Signals) -> None:
            # said at once: a log shows whether a signal reached the gateway, and how long stopping took
            log.info("%s: %s", signum.name, "already stopping" if stop.is_set() else "stopping")
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        await serve_gateway(config, stop)

    try:
        asyncio.run(main())
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    log.info("gateway stopped")
    return 0
