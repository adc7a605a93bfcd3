"""`serve()`: run the control plane in this process under uvicorn until SIGTERM or SIGINT.

A signal ends long polls at once, lets requests in flight finish, drops idle keep-alive connections (without
waiting for their clients' side of the TLS close), flushes presence and closes the database; the process then exits
with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import logging
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import uvicorn
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE

from strata.control.app import create_app
from strata.control.db import safe_url
from strata.control.events import event_retention_seconds
from strata.control.pki import default_server_names
from strata.control.plane import ControlPlane, first_start_lock
from strata.control.settings import ServerSettings
from strata.control.supply import read_release_keys
from strata.control.telemetry import retention_seconds
from strata.control.tls import (
    DEFAULT_MAX_CONNECTIONS,
    ConnectionLimits,
    MutualTlsHttpProtocol,
    server_context_args,
)
from strata.core.errors import ConfigError, StrataError
from strata.core.hashing import is_hex_sha256
from strata.core.logformat import check_log_format
from strata.core.openfiles import effective_max_connections, raise_open_files_limit
from strata.core.words import parse_duration, parse_retention

MAX_NODE_CERT_S: Final = 397 * 86400.0  # the longest certificate life browsers take (CA/Browser Forum)

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")

# Requests still running this long after a shutdown signal are cancelled (long polls end at once anyway).
GRACEFUL_SHUTDOWN_S = 10
# A connection closed at shutdown whose TLS close the client has not answered after this long is dropped.
TLS_CLOSE_WAIT_S = 0.5


class _Server(uvicorn.Server):
    """uvicorn's server, told about the control plane: it announces where it listens, ends long polls as
    soon as shutdown begins (uvicorn would otherwise wait for them), and exits normally after a signal."""

    def __init__(self, config: uvicorn.Config, plane: ControlPlane) -> None:
        super().__init__(config)
        self._plane = plane

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info("strata server listening on https://%s:%d (data: %s)", host, port, self._plane.settings.data_dir)
            log.info("database: %s", safe_url(self._plane.db.engine.url))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._plane.feed.close()
        dropper = asyncio.create_task(self._drop_closed_connections())
        try:
            await super().shutdown(sockets)
        finally:
            dropper.cancel()

    async def _drop_closed_connections(self) -> None:
        """Abort the connections uvicorn has closed, once all they were sent has gone out, whose TLS close waits on
        the client. A TLS close waits for the client's own close_notify, which a client holding an idle keep-alive
        connection (an agent between calls, an operator's tool) sends only when it next reads: every such
        connection held the shutdown for the whole GRACEFUL_SHUTDOWN_S, and a supervisor that stops sooner killed
        the server before it flushed presence."""
        while True:
            await asyncio.sleep(TLS_CLOSE_WAIT_S)
            for connection in list(self.server_state.connections):
                if not isinstance(connection, MutualTlsHttpProtocol):
                    continue
                transport = connection.transport
                if transport.is_closing() and transport.get_write_buffer_size() == 0:
                    transport.abort()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises the signal after a graceful shutdown, which would make the exit status -15; a
        # shutdown that completed is a normal exit for strata.
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# Requests that arrive all the time and say nothing when they succeed: probes (every few seconds per balancer
# and kubelet) and nodes' desired-state long polls (one per node per poll wait). Their access-log lines drowned
# the rest; they are logged at --log-level debug, or when they fail.
_QUIET_PATHS: Final = re.compile(r"/(healthz|readyz)|/v1/nodes/[^/?]+/desired")


class QuietAccessLog(logging.Filter):
    """Drops uvicorn's access-log line of a successful probe or long poll (`_QUIET_PATHS`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) != 5:  # uvicorn's (client, method, path, version, status)
            return True
        path, status = str(args[2]).partition("?")[0], args[4]
        return not (_QUIET_PATHS.fullmatch(path) and isinstance(status, int) and status < 400)


def _logging_config(level: str, log_format: str = "text") -> dict[str, Any]:
    """uvicorn's logging configuration with strata's loggers, in `log_format`, quiet access log unless debug."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["strata"] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    if log_format == "json":
        config["formatters"] = {name: {"()": "strata.core.logformat.JsonFormatter"} for name in ("default", "access")}
        config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # one stream of JSON lines
    if level != "debug":
        config["filters"] = {"quiet": {"()": "strata.control.server.QuietAccessLog"}}
        config["handlers"]["access"]["filters"] = ["quiet"]
    return config


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to `host`:`port` (one per address the host resolves to, as asyncio's `create_server` binds
    them), not yet listening: uvicorn listens on them once the application has started. `serve` binds them before
    it writes anything, so a port that is taken is one line and an exit code, with no data folder made for a
    server that never ran (uvicorn found it after the start-up had written the admin token and taken the rollouts
    job, and exited 3, the code `strata` documents for a refused credential).

    Raises:
        ConfigError: a port out of range, a host that does not resolve, or an address that cannot be bound (in
            use, not this machine's, or a privileged port).
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    where = _where(host, port)
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {where}: --host {host!r} does not resolve ({exc.strerror})") from exc
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(addresses):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # as asyncio binds: a restart is not refused over connections of the last run still in TIME_WAIT, and
            # an IPv6 socket leaves the IPv4 address to its own
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(_bind_refused(where, exc)) from exc
    return sockets


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_refused(where: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is in use (another server has it): give another --port"
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: ports below 1024 need privileges: give another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: --host is not an address of this machine"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def serve(
    *,
    data_dir: Path,
    host: str = "127.0.0.1",
    port: int = 8700,
    db_url: str | None = None,
    log_level: str = "info",
    log_format: str = "text",
    otlp_endpoint: str | None = None,
    telemetry_retention: str = "90d",
    event_retention: str = "365d",
    node_cert_lifetime: str = "30d",
    max_connections: int | None = None,
    header_timeout: str = "10s",
    tls_names: tuple[str, ...] = (),
    agent_allowlist: tuple[str, ...] = (),
    release_keys: tuple[Path, ...] = (),
    cloud_endpoints: tuple[str, ...] = (),
    tpm_cas: tuple[Path, ...] = (),
    tpm_pcrs: tuple[str, ...] = (),
) -> None:
    """Run the control plane on `https://host:port` with its data in `data_dir`, until SIGTERM or SIGINT.

    The admin token is in `data_dir/admin.token`, and the fleet CA in `data_dir/ca.pem`, before the server listens.
    There is no plain-HTTP listener: nodes authenticate with their fleet certificates (mutual TLS), operators with
    bearer tokens over TLS. With `release_keys` (PEM public keys), uploads must be signed by one of them and
    enrolling nodes pin them (see `strata.control.supply`). With `tpm_cas`, nodes with a TPM certified by one of
    those manufacturer CAs attest with quotes (see `strata.control.attestation`).

    Raises:
        ConfigError: an unknown log level or format, an address that cannot be listened on (`listen_sockets`),
            a data folder that cannot be created, an unusable database URL (one that does not parse, or a driver not
            installed: `strata[postgres]`), a cloud endpoint that is not an http(s) URL (cloud or OTLP), a release
            key that is not a PEM public key, an allowlist entry that is not a code hash, a TPM CA file or PCR value
            that does not parse, a telemetry retention that is not a duration of at least an hour, or an event
            retention that is not one of at least a day, a node certificate lifetime that is not one of at least
            an hour, a connection cap under 1, a header timeout that is not a duration from 1 s to 10 minutes, or a
            fleet's data folder whose SQLite database is missing (`plane.refuse_lost_database`).
        StoreError: the database cannot be reached, refuses the login, or cannot be migrated.
        StrataError: the application's start-up failed (the reason is logged).
    """
    level = log_level.lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level {log_level!r} is not one of {list(LOG_LEVELS)}")
    check_log_format(log_format)
    data_dir = data_dir.expanduser().resolve()
    for url in cloud_endpoints:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--cloud-endpoint must be an http:// or https:// URL, got {url!r}")
    read_release_keys(release_keys)  # a bad key is one line now, not a traceback from the application's start-up
    for code in agent_allowlist:  # anything else would match no node's report: no node would ever attest
        if not (code.startswith("sha256:") and is_hex_sha256(code.removeprefix("sha256:"))):
            raise ConfigError(f"--agent-allowlist takes agent code hashes, sha256:<64 hex digits>; got {code!r}")
    if otlp_endpoint is not None and not otlp_endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"--otlp-endpoint must be an http:// or https:// URL, got {otlp_endpoint!r}")
    retention_s = retention_seconds(telemetry_retention)
    cert_s = parse_retention(node_cert_lifetime, "--node-cert-lifetime", 3600.0)
    if cert_s > MAX_NODE_CERT_S:
        raise ConfigError(f"--node-cert-lifetime must be at most 397d, got {node_cert_lifetime}")
    if max_connections is not None and max_connections < 1:
        raise ConfigError(f"--max-connections must be at least 1, got {max_connections}")
    try:
        header_timeout_s = parse_duration(header_timeout)
    except ConfigError as exc:
        raise ConfigError(f"--header-timeout: {exc}") from exc
    if not 1 <= header_timeout_s <= 600:
        raise ConfigError(f"--header-timeout must be from 1s to 10m, got {header_timeout!r}")
    limits = ConnectionLimits(max_connections or DEFAULT_MAX_CONNECTIONS, header_timeout_s)
    settings = ServerSettings(
        data_dir=data_dir,
        db_url=db_url,
        telemetry_retention_s=retention_s,
        event_retention_s=event_retention_seconds(event_retention),
        node_cert_hours=cert_s / 3600,
        otlp_endpoint=otlp_endpoint,
        agent_allowlist=agent_allowlist,
        release_keys=tuple(path.expanduser().resolve() for path in release_keys),
        cloud_endpoints=tuple(cloud_endpoints),
        tpm_cas=tuple(path.expanduser().resolve() for path in tpm_cas),
        tpm_pcrs=tuple(tpm_pcrs),
    )
    sockets = listen_sockets(host, port)  # before the data folder: nothing is written for a server that cannot run
    try:
        names = tls_names or default_server_names(host)
        server = _prepared(settings, names, level, log_format, limits, explicit_cap=max_connections is not None)
        try:
            server.run(sockets)
        except OSError as exc:  # another process bound the address as well, and listened on it first
            raise ConfigError(_bind_refused(_where(host, port), exc)) from exc
        except SystemExit as exc:
            # uvicorn exits 3 when the application's start-up fails, having logged why; for `strata` 3 is a
            # refused credential
            if exc.code == STARTUP_FAILURE:
                raise StrataError("the control plane did not start: the reason is logged above") from exc
            raise
    finally:
        for sock in sockets:  # uvicorn closes them when it stops, not when something failed before it ran
            sock.close()


def _prepared(
    settings: ServerSettings,
    tls_names: tuple[str, ...],
    level: str,
    log_format: str,
    limits: ConnectionLimits | None = None,
    explicit_cap: bool = False,
) -> _Server:
    """The server of `serve`, ready to run: its data folder made, its database migrated, its CA and certificate
    made, its open files limit raised and its connection cap set under it (`limits`: `ConnectionLimits()`; a cap
    the operator gave that the limit lowers is a WARNING, the default's an INFO line).

    Raises:
        ConfigError, StoreError: as `serve` says.
    """
    data_dir = settings.data_dir
    # Everything the server writes (database, blobs, keys, tokens) is for its own user alone.
    os.umask(0o077)
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"cannot create the data folder {data_dir}: {exc}") from exc
    app = create_app(settings)
    plane: ControlPlane = app.state.plane
    # Migrate before uvicorn starts, so an unreachable database or a refused login is one line on stderr (the
    # lifespan's own upgrade then finds nothing to do). Neither message nor log holds the password. Replicas
    # sharing the data folder (or the database) migrate and make the CA one at a time.
    with first_start_lock(data_dir), plane.migration_lock():
        plane.migrate()
        plane.pki.start()
        tls = plane.pki.server_tls(tls_names)
    wanted = limits or ConnectionLimits()
    open_files = raise_open_files_limit()
    limits = ConnectionLimits(effective_max_connections(wanted.max_connections, open_files), wanted.header_timeout_s)
    config = uvicorn.Config(
        app,
        log_level=level,
        log_config=_logging_config(level, log_format),
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        **server_context_args(str(tls.cert_path), str(tls.key_path), str(tls.ca_path), limits),
    )
    if limits.max_connections < wanted.max_connections:  # logged now: uvicorn's Config set up the logging
        log.log(
            logging.WARNING if explicit_cap else logging.INFO,
            "the open files limit (%d) leaves room for %d connections, not %d: raise it (LimitNOFILE=, ulimit -n)"
            " to serve more nodes from this server",
            open_files,
            limits.max_connections,
            wanted.max_connections,
        )
    return _Server(config, plane)
