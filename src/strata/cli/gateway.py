"""`strata gateway`: a local inference endpoint that falls back from this node to its parent, then the cloud."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer


def gateway(
    listen: Annotated[int, typer.Option("--listen", help="Port of the gateway's inference API.")] = 8090,
    host: Annotated[str, typer.Option("--host", help="Address of the gateway's inference API.")] = "127.0.0.1",
    local: Annotated[str | None, typer.Option("--local", help="This node's own inference URL (its agent).")] = None,
    parent: Annotated[
        list[str] | None, typer.Option("--parent", help="A parent near-edge node's inference URL (repeatable).")
    ] = None,
    cloud: Annotated[
        list[str] | None, typer.Option("--cloud", help="A cloud inference URL, any OIP server (repeatable).")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="The node agent's data folder: the gateway acts as that node (its fleet certificate) to read its "
            "topology and to reach its parents over mutual TLS.",
            file_okay=False,
        ),
    ] = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server", envvar="STRATA_SERVER", help="Read parents and cloud from this control plane (as an operator)."
        ),
    ] = None,
    node: Annotated[str | None, typer.Option("--node", help="The node's id, for its topology (with --server).")] = None,
    token: Annotated[
        str | None, typer.Option("--token", envvar="STRATA_TOKEN", help="An operator token (with --server).")
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option("--ca", envvar="STRATA_CA", help="The fleet CA (the control plane's ca.pem), with --server."),
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Longest wait for one tier's answer, seconds.")] = 10.0,
    connect_timeout: Annotated[
        float, typer.Option("--connect-timeout", help="Longest wait for a connection to a tier, seconds.")
    ] = 2.0,
    budget_ms: Annotated[
        float | None,
        typer.Option("--budget-ms", help="Latency budget of requests that send no Strata-Budget-Ms header."),
    ] = None,
    max_response_mb: Annotated[
        float,
        typer.Option("--max-response-mb", help="Largest answer read from a tier; past it that tier failed (502)."),
    ] = 64.0,
    breaker_failures: Annotated[
        int, typer.Option("--breaker-failures", help="Failures in a row that open a tier's circuit breaker.")
    ] = 3,
    breaker_cooldown: Annotated[
        float, typer.Option("--breaker-cooldown", help="Seconds an open breaker waits before a trial request.")
    ] = 5.0,
    health_interval: Annotated[
        float, typer.Option("--health-interval", help="Seconds between health probes of each tier.")
    ] = 2.0,
    topology_interval: Annotated[
        float, typer.Option("--topology-interval", help="Seconds between reads of the topology.")
    ] = 30.0,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve the Open Inference Protocol locally and send each request to this node's agent, else its parent
    near-edge node, else the cloud; answers say which tier served them (Strata-Served-By)."""
    from strata.core.logformat import check_log_level
    from strata.route.breaker import BreakerConfig
    from strata.route.gateway import GatewayConfig, run
    from strata.route.router import RouterConfig

    level = check_log_level(log_level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # httpx logs every request it sends at INFO: a line per forwarded request and per health probe (one a second
    # per model and tier at the default interval). Those lines are for --log-level debug only.
    logging.getLogger("httpx").setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    config = GatewayConfig(
        host=host,
        port=listen,
        local=local,
        parents=tuple(parent or ()),
        cloud=tuple(cloud or ()),
        server=server,
        node_id=node,
        token=token,
        data_dir=data_dir,
        ca=ca,
        topology_interval_s=topology_interval,
        router=RouterConfig(
            timeout_s=timeout,
            connect_timeout_s=connect_timeout,
            budget_s=budget_ms / 1000 if budget_ms is not None else None,
            breaker=BreakerConfig(failure_threshold=breaker_failures, cooldown_s=breaker_cooldown),
            health_interval_s=health_interval,
            max_response_bytes=int(max_response_mb * (1 << 20)),
        ),
    )
    code = run(config)
    if code:
        raise typer.Exit(code)
