"""`strata agent`: run the edge agent on this node.

The command checks its options, then replaces itself (exec) with the lean agent process
`python -m strata.agent`, which imports neither Typer nor Rich: the agent must stay under 70 MB resident.
The configuration travels in the STRATA_AGENT_CONFIG environment variable, so the enrollment token does
not stay visible in the process list.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from strata.agent.config import CONFIG_ENV, AgentConfig
from strata.cli.common import ConfigOption, LogFormatOption, parse_duration, parse_label_options


def agent(
    server: Annotated[str, typer.Option("--server", envvar="STRATA_SERVER", help="Control plane URL.")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Folder for credentials, packages and state.")],
    name: Annotated[str, typer.Option("--name", help="This node's name in the fleet.")],
    tier: Annotated[str, typer.Option("--tier", help="device, near-edge or cloud.")] = "device",
    label: Annotated[
        list[str] | None, typer.Option("--label", help="Node label k=v (repeatable), used by deployment selectors.")
    ] = None,
    enroll_token: Annotated[
        str | None,
        typer.Option(
            "--enroll-token",
            envvar="STRATA_ENROLL_TOKEN",
            help="One-time token; not used once enrolled (see --replace).",
        ),
    ] = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Enroll even when a node has this --name already: that node is re-keyed and the machine that holds "
            "the name now loses its credential (needs a token from `strata nodes reenroll NAME`).",
        ),
    ] = False,
    serve_host: Annotated[str, typer.Option("--serve-host", help="Address of the inference API.")] = "127.0.0.1",
    serve_port: Annotated[int, typer.Option("--serve-port", help="Port of the inference API.")] = 8080,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            "--grpc-port",
            help="Serve the inference API over gRPC too (KServe v2 / Triton clients), on --serve-host, under the "
            "REST port's limits: connections, header and body timeouts, the request budget (needs strata[grpc]; off "
            "by default). gRPC says a message's size only once it has read it whole, so each call is charged "
            "--grpc-max-message-mb of --request-budget-mb before it is read, and its own size once read: by "
            "default 31 inferences are read at once, and one message's worth is kept for health and "
            "metadata calls. Memory held: the budget plus ~100 KiB per open call (at most --max-connections).",
        ),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Stand in for this hardware profile instead of the detected one.")
    ] = None,
    poll_wait: Annotated[float, typer.Option("--poll-wait", help="Long-poll wait in seconds (0-60).")] = 30.0,
    max_download_rate: Annotated[
        int | None, typer.Option("--max-download-rate", help="Cap downloads at this many bytes per second.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--intra-op-threads",
            "--threads",
            help="onnxruntime intra-op threads per model in each serving process (default: cores / processes; "
            "with one process, onnxruntime's own choice).",
        ),
    ] = None,
    serve_processes: Annotated[
        int | None,
        typer.Option(
            "--serve-processes",
            help="Processes serving the inference port together (default: one per core; 1 on devices).",
        ),
    ] = None,
    event_loop: Annotated[
        str | None,
        typer.Option(
            "--event-loop",
            help="The serving processes' event loop: uvloop (libuv's, +12% requests per second on a small model) "
            "or asyncio (1.4 MB less resident). Default: asyncio on devices, uvloop on the other tiers.",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning or error.")] = "info",
    log_format: LogFormatOption = "text",
    telemetry_budget_mb: Annotated[
        float, typer.Option("--telemetry-budget-mb", help="Disk the telemetry buffer may use during outages.")
    ] = 64.0,
    telemetry_sample_rate: Annotated[
        float, typer.Option("--telemetry-sample-rate", help="Share of ordinary requests kept as events (0-1).")
    ] = 0.01,
    telemetry_slow_ms: Annotated[
        float, typer.Option("--telemetry-slow-ms", help="Requests slower than this are always kept as events.")
    ] = 250.0,
    tier_port: Annotated[
        int | None,
        typer.Option("--tier-port", help="Serve other tiers (and the relay) here, over mutual TLS with fleet certs."),
    ] = None,
    tier_host: Annotated[
        str | None, typer.Option("--tier-host", help="Address of the tier listener (default: --serve-host).")
    ] = None,
    tpm: Annotated[
        str | None,
        typer.Option(
            "--tpm",
            help="Quote attestation reports with this TPM, as a tpm2-tss TCTI: device:/dev/tpmrm0, or "
            "swtpm:host=127.0.0.1,port=2321 for a software TPM (needs strata[tpm]).",
        ),
    ] = None,
    relay: Annotated[
        list[str] | None,
        typer.Option(
            "--relay", help="Parent near-edge node's tier URL (https://host:tier-port), tried first (repeatable)."
        ),
    ] = None,
    relay_cache_mb: Annotated[
        float | None,
        typer.Option("--relay-cache-mb", help="Relay pieces for child devices with this cache (near-edge: 2048)."),
    ] = None,
    telemetry_interval: Annotated[
        float, typer.Option("--telemetry-interval", help="Seconds between telemetry uploads.")
    ] = 10.0,
    probation: Annotated[
        str,
        typer.Option(
            "--probation",
            help="After activating a version, watch its errors and latency this long (or 500 requests) and roll "
            "back by itself if they are bad; 0 turns it off.",
        ),
    ] = "60s",
    report_interval: Annotated[
        str, typer.Option("--report-interval", help="Report changed serving counters at most this often.")
    ] = "60s",
    golden_timeout: Annotated[
        str,
        typer.Option(
            "--golden-timeout",
            help="A version whose golden check (its package's recorded inputs, run before it serves) takes longer "
            "fails (1s-24h).",
        ),
    ] = "5m",
    request_timeout: Annotated[
        str,
        typer.Option(
            "--request-timeout",
            help="How long a request to the control plane or a parent relay may go unanswered (1s to 10m); past "
            "it a download from a relay must keep coming at 16 KiB/s.",
        ),
    ] = "30s",
    encrypt_at_rest: Annotated[
        bool,
        typer.Option(
            "--encrypt-at-rest/--no-encrypt-at-rest",
            help="Keep package files and downloaded pieces sealed with this node's data key (AES-256-GCM); "
            "models are decrypted only in memory.",
        ),
    ] = True,
    max_batch_size: Annotated[
        int, typer.Option("--max-batch-size", help="Most rows merged into one runtime call per model (1: no batching).")
    ] = 32,
    max_queue_delay_us: Annotated[
        int,
        typer.Option("--max-queue-delay-us", help="How long a request may wait for others to join its batch."),
    ] = 0,
    preferred_batch_size: Annotated[
        list[int] | None,
        typer.Option("--preferred-batch-size", help="Cut batches at this size when reached (repeatable)."),
    ] = None,
    max_queue_size: Annotated[
        int, typer.Option("--max-queue-size", help="Most requests waiting per model; more are answered 503.")
    ] = 256,
    max_queue_wait_ms: Annotated[
        float,
        typer.Option("--max-queue-wait-ms", help="Answer 503 at once when the estimated wait is longer (0: no bound)."),
    ] = 5000.0,
    instances: Annotated[
        int, typer.Option("--instances", help="Runtime calls of one model that may run at once (worker threads).")
    ] = 2,
    max_request_mb: Annotated[
        float, typer.Option("--max-request-mb", help="Largest inference request body (413 past it).")
    ] = 64.0,
    request_budget_mb: Annotated[
        float,
        typer.Option(
            "--request-budget-mb", help="Request bodies all connections of a listener may hold at once (503 past it)."
        ),
    ] = 128.0,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="Connections each listener serves at once (503 past it).")
    ] = 1024,
    header_timeout: Annotated[
        str, typer.Option("--header-timeout", help="A request's headers must arrive within this (408, closed).")
    ] = "10s",
    body_timeout: Annotated[
        str, typer.Option("--body-timeout", help="A whole request must arrive within this (408, closed).")
    ] = "60s",
    grpc_max_message_mb: Annotated[
        float | None,
        typer.Option(
            "--grpc-max-message-mb",
            help="Largest gRPC message (RESOURCE_EXHAUSTED past it). Default 4, gRPC's own, or less to stay within "
            "--max-request-mb and half of --request-budget-mb; larger means fewer calls read at once.",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Enroll (once), pull desired state, fetch and verify packages, activate them atomically, and serve
    the Open Inference Protocol on --serve-port; keeps serving when the control plane is gone."""
    labels = parse_label_options(label or [])
    if profile is not None:
        from strata.core.profiles import get_profile

        get_profile(profile)
    agent_config = AgentConfig(
        server=server,
        data_dir=data_dir.resolve(),
        name=name,
        tier=tier,
        labels=labels,
        enroll_token=enroll_token,
        replace=replace,
        serve_host=serve_host,
        serve_port=serve_port,
        grpc_port=grpc_port,
        profile=profile,
        poll_wait_s=poll_wait,
        max_download_rate=max_download_rate,
        inference_threads=threads,
        serve_processes=serve_processes,
        event_loop=event_loop,
        log_level=log_level,
        log_format=log_format,
        telemetry_budget_mb=telemetry_budget_mb,
        telemetry_sample_rate=telemetry_sample_rate,
        telemetry_slow_ms=telemetry_slow_ms,
        telemetry_interval_s=telemetry_interval,
        relays=tuple(relay or ()),
        tier_port=tier_port,
        tier_host=tier_host,
        tpm=tpm,
        relay_cache_mb=relay_cache_mb,
        probation_s=parse_duration(probation),
        golden_timeout_s=parse_duration(golden_timeout),
        report_interval_s=parse_duration(report_interval),
        request_timeout_s=parse_duration(request_timeout),
        encrypt_at_rest=encrypt_at_rest,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        preferred_batch_sizes=tuple(preferred_batch_size or ()),
        max_queue_size=max_queue_size,
        max_queue_wait_ms=max_queue_wait_ms if max_queue_wait_ms > 0 else None,
        model_instances=instances,
        max_request_mb=max_request_mb,
        request_budget_mb=request_budget_mb,
        max_connections=max_connections,
        header_timeout_s=parse_duration(header_timeout),
        body_timeout_s=parse_duration(body_timeout),
        grpc_max_message_mb=grpc_max_message_mb,
    )
    env = {**os.environ, CONFIG_ENV: agent_config.to_env()}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-OO", "-m", "strata.agent"], env)
