"""A small HTTP(S) client for talking to the demo's proxies on loopback.

Proxies listen on 127.0.0.1 but are addressed by name (Host header, TLS SNI, certificate check),
which ``urllib`` cannot separate; this client connects to an address and speaks for any host.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .pki import IssuedCert


@dataclass(frozen=True)
class ClientTls:
    """Trust *ca_path*, send SNI *server_name* and check the server cert against it."""

    ca_path: Path
    server_name: str
    client_cert: IssuedCert | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        if self.client_cert is not None:
            context.load_cert_chain(str(self.client_cert.cert_path), str(self.client_cert.key_path))
        return context


@dataclass(frozen=True)
class Reply:
    """An HTTP response with lower-case header names."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """Connects to the given address but handshakes as *tls.server_name*."""

    def __init__(self, address: str, port: int, tls: ClientTls, timeout: float,
                 source_address: tuple[str, int] | None = None) -> None:
        super().__init__(address, port, timeout=timeout, context=tls.context(), source_address=source_address)
        self._server_name = tls.server_name

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout, self.source_address)
        self.sock = self._context.wrap_socket(sock, server_hostname=self._server_name)


def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    host: str | None = None,
    headers: Mapping[str, str | list[str]] | None = None,
    body: bytes | None = None,
    tls: ClientTls | None = None,
    address: str = "127.0.0.1",
    source: str | None = None,
    timeout_s: float = 5.0,
) -> Reply:
    """Send one request to *address*:*port*; *host* defaults to the TLS server name or address.

    A header given as a list is sent once per value (a repeated header); *source* is the local
    address to connect from (another loopback address stands for another client).
    """
    connection: http.client.HTTPConnection
    bind = (source, 0) if source else None
    if tls is None:
        connection = http.client.HTTPConnection(address, port, timeout=timeout_s, source_address=bind)
    else:
        connection = _NamedHTTPSConnection(address, port, tls, timeout_s, bind)
    all_headers = {"host": host or (tls.server_name if tls else address), **(headers or {})}
    if body is not None:
        all_headers["content-length"] = str(len(body))
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in all_headers.items():
            for one in value if isinstance(value, list) else [value]:
                connection.putheader(name, one)
        connection.endheaders(body)
        response = connection.getresponse()
        return Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()
