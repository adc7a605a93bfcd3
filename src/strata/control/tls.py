"""HTTPS with mutual TLS for the control plane under uvicorn.

uvicorn verifies client certificates (against the fleet CA) but does not tell the application which one was
presented; this protocol adds the ASGI TLS extension (`scope["extensions"]["tls"]`, with the verified leaf in
`client_cert_chain`) so the API can authorize a node by the id its certificate names.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, or None on a plain one."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,
        "tls_version": None,
        "cipher_suite": None if cipher is None else cipher[0],
    }


class MutualTlsHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the TLS extension in every request's scope."""

    _tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvicorn's protocol narrows the argument to a stream transport, which its server always hands it
        super().connection_made(cast(asyncio.Transport, transport))
        self._tls = tls_extension(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            scope = cast(dict[str, Any], self.scope)  # uvicorn's scope TypedDict has no `extensions` key
            scope["extensions"] = {"tls": self._tls}


def server_context_args(cert: str, key: str, ca: str) -> dict[str, Any]:
    """uvicorn Config arguments for HTTPS that asks for (and verifies) client certificates from the fleet CA.

    Certificates are optional at the TLS layer because operators authenticate with bearer tokens and enrolling
    nodes have none yet; the API refuses node calls without one.
    """
    return {
        "ssl_certfile": cert,
        "ssl_keyfile": key,
        "ssl_ca_certs": ca,
        "ssl_cert_reqs": ssl.CERT_OPTIONAL,
        "http": MutualTlsHttpProtocol,
    }
