"""uvicorn wiring: the mutual-TLS context, and how the peer certificate reaches a request.

The handshake itself enforces checklist items 1 and 2: TLS 1.2 or newer, and a client
certificate that chains to the configured CA (CERT_REQUIRED). Each HTTP connection then
hands its verified peer certificate to every request it carries through the ASGI TLS
extension, so identity is decided per request (item 4).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from kme.config import ServerSettings
from kme.errors import ConfigError

log = logging.getLogger("kme.server")

TLS_1_2 = 0x0303


def tls_context(server: ServerSettings) -> ssl.SSLContext:
    """The KME's TLS context, or ConfigError naming the field whose file is unusable."""
    return mutual_tls_server_context(
        server.certfile,
        server.keyfile,
        server.ca_file,
        fields=("server.certfile", "server.keyfile", "server.ca_file"),
    )


def mutual_tls_server_context(
    certfile: Path, keyfile: Path, ca_file: Path, *, fields: tuple[str, str, str]
) -> ssl.SSLContext:
    """TLS 1.2+, a client certificate required and verified against `ca_file`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    cert_field, key_field, ca_field = fields
    for field, path in ((cert_field, certfile), (key_field, keyfile)):
        if not path.is_file():
            raise ConfigError(f"field '{field}': no such file {path}")
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"fields '{cert_field}'/'{key_field}': {certfile} and "
            f"{keyfile} are not a matching PEM certificate and key ({exc})"
        ) from None
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"field '{ca_field}': cannot load CA certificates from {ca_file} ({exc})"
        ) from None
    return context


class MutualTLSProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus the ASGI TLS extension for the connection's requests."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if ssl_object is None or not der:
            return
        cipher = ssl_object.cipher()
        tls: dict[str, Any] = {
            "server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)],
            "client_cert_name": None,
            "client_cert_error": None,
            "tls_version": _VERSIONS.get(ssl_object.version() or ""),
            "cipher_suite": None,
            "cipher_name": cipher[0] if cipher else None,
        }
        inner = self.app

        async def with_tls(scope: Any, receive: Any, send: Any) -> None:
            scope["extensions"] = {**scope.get("extensions", {}), "tls": tls}
            await inner(scope, receive, send)

        self.app = with_tls


_VERSIONS = {"TLSv1.2": TLS_1_2, "TLSv1.3": 0x0304}


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a busy port is one clear sentence."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        raise ConfigError(
            f"fields 'server.host'/'server.port': cannot listen on {host}:{port} "
            f"({exc.strerror or exc})"
        ) from None
    sock.set_inheritable(True)
    return sock


def build_server(app: FastAPI, server: ServerSettings, *, host: str, port: int) -> uvicorn.Server:
    return mutual_tls_server(
        app, tls_context(server), host=host, port=port, access_log=server.access_log
    )


def mutual_tls_server(
    app: Any,
    context: ssl.SSLContext,
    *,
    host: str,
    port: int,
    access_log: bool = False,
    graceful_seconds: int | None = None,
) -> uvicorn.Server:
    """uvicorn serving `app` over `context`, with each request's peer certificate in scope."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=MutualTLSProtocol,
        ws="none",
        lifespan="on",
        # The trusted-proxy decision needs the real peer address: never rewrite it.
        proxy_headers=False,
        server_header=False,
        access_log=access_log,
        log_config=None,
        ssl_context_factory=lambda _config, _default: context,
        # None waits for idle keep-alive connections to close, which peers may never do.
        timeout_graceful_shutdown=graceful_seconds,
    )
    return uvicorn.Server(config)
