"""A fleet CA's server and client TLS contexts, and the agent's HTTP server run on its own event loop in a thread
(the tests' client sockets block), for the tests of its TLS listener."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from strata.agent.httpd import HttpServer
from strata.agent.identity import FleetIdentity
from strata.trust.ca import FleetCA
from strata.trust.node import make_csr


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext


def fleet_tls(folder: Path) -> Tls:
    """A new fleet CA, and the contexts of two of its nodes: `server` (a tier listener's) and `client`."""
    ca = FleetCA.create("fleet", dt.datetime.now(dt.UTC))
    identities = []
    for name in ("server", "client"):
        identity = FleetIdentity(folder / name / "trust")
        identity.folder.mkdir(parents=True)
        identity.ca_path.write_bytes(ca.cert_pem)
        identity.cert_path.write_bytes(
            ca.sign_node_csr(make_csr(identity.key_path, name), name, dt.datetime.now(dt.UTC)).pem
        )
        identities.append(identity)
    return Tls(identities[0].server_context(), identities[1].peer_context())


@contextlib.contextmanager
def serving(
    server: HttpServer, context: ssl.SSLContext, event_loop: str = "asyncio"
) -> Iterator[asyncio.AbstractEventLoop]:
    """`server` listening on loopback over TLS, on a loop in its own thread (asyncio's or uvloop's, as the agent
    runs either); both are stopped on the way out."""
    if event_loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start("127.0.0.1", 0, ssl=context))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield loop
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)  # nothing when a test stopped it
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
