"""`strata server`: run the control plane."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Annotated

import typer

from strata.cli.common import ConfigOption, LogFormatOption


def server(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="Folder for the database, blobs and admin.token.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8700,
    db: Annotated[
        str | None,
        typer.Option("--db", help="SQLAlchemy URL of the database (default: an SQLite file in the data folder)."),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option(
            "--log-level",
            help="debug, info, warning or error. Successful probes and long polls are left out of the access log "
            "unless debug.",
        ),
    ] = "info",
    log_format: LogFormatOption = "text",
    tls_name: Annotated[
        list[str] | None,
        typer.Option("--tls-name", help="DNS name or address the HTTPS certificate covers (repeatable)."),
    ] = None,
    agent_allowlist: Annotated[
        list[str] | None,
        typer.Option(
            "--agent-allowlist",
            help="Agent code hash (sha256:...) nodes may attest to (repeatable; default: this server's release).",
        ),
    ] = None,
    otlp_endpoint: Annotated[
        str | None,
        typer.Option("--otlp-endpoint", help="Also forward telemetry to this OpenTelemetry collector (OTLP/HTTP)."),
    ] = None,
    telemetry_retention: Annotated[
        str,
        typer.Option(
            "--telemetry-retention",
            help="Delete node telemetry (minutes, events, drift counts) older than this, e.g. 30d, 36h (at least 1h; "
            "the telemetry API reaches back 90d).",
        ),
    ] = "90d",
    event_retention: Annotated[
        str,
        typer.Option(
            "--event-retention",
            help="Delete fleet events (strata events, rollout timelines) older than this, e.g. 90d (at least 1d).",
        ),
    ] = "365d",
    node_cert_lifetime: Annotated[
        str,
        typer.Option(
            "--node-cert-lifetime",
            help="How long a node certificate lasts, e.g. 30d, 7d (at least 1h). Agents renew once a third is left: a"
            " node offline longer must be enrolled again. Revoking a node cuts it off at once whatever is left.",
        ),
    ] = "30d",
    max_connections: Annotated[
        int | None,
        typer.Option(
            "--max-connections",
            help="Connections this server process keeps open at most (every node long-polls on one); past it a new "
            "one is closed at once. Default 50,000, kept 256 under the open files limit, which the server raises "
            "to its hard limit.",
        ),
    ] = None,
    header_timeout: Annotated[
        str,
        typer.Option(
            "--header-timeout",
            help="A request's head must arrive within this of the connection's start or of the previous answer "
            "(408, closed); 1s to 10m.",
        ),
    ] = "10s",
    release_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--release-key",
            help="Release public key (PEM, repeatable): uploads must be signed by one, and nodes pin them at "
            "enrollment. Without any, unsigned packages are accepted (development).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    tpm_ca: Annotated[
        list[Path] | None,
        typer.Option(
            "--tpm-ca",
            help="TPM manufacturer CA certificates (PEM, repeatable): nodes whose TPM's EK certificate one of them "
            "issued can attest at level 'tpm' with quotes.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    tpm_pcr: Annotated[
        list[str] | None,
        typer.Option(
            "--tpm-pcr",
            help="A PCR value 'tpm' attestation requires, as BANK:INDEX=HEX (repeatable; e.g. sha256:7=...).",
        ),
    ] = None,
    cloud_endpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--cloud-endpoint",
            help="An Open Inference Protocol server (URL) that takes overflow inference from every node (repeatable).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run the control plane over HTTPS (mutual TLS for nodes): registry, inventory, rollouts, telemetry, under /v1."""
    from strata.control.server import serve

    serve(
        data_dir=data_dir,
        host=host,
        port=port,
        db_url=db,
        log_level=log_level,
        log_format=log_format,
        otlp_endpoint=otlp_endpoint,
        telemetry_retention=telemetry_retention,
        event_retention=event_retention,
        node_cert_lifetime=node_cert_lifetime,
        max_connections=max_connections,
        header_timeout=header_timeout,
        tls_names=tuple(tls_name or ()),
        agent_allowlist=tuple(agent_allowlist or ()),
        release_keys=tuple(release_key or ()),
        cloud_endpoints=tuple(cloud_endpoint or ()),
        tpm_cas=tuple(tpm_ca or ()),
        tpm_pcrs=tuple(tpm_pcr or ()),
    )
    # The server has stopped: presence flushed, database closed, logs written. What is left is Python tearing
    # its heap down object by object, with full garbage collections over every module's objects: 0.5 s of CPU
    # here, and 4-10 s on a loaded 2-core machine, between "Finished server process" and the exit. Frozen
    # objects are skipped by those collections; the OS takes the memory back at once.
    gc.freeze()
