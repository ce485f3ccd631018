"""A bounded HTTP(S) GET on the event loop, for JWKS and OIDC discovery documents.

Why not ``urllib`` in a thread: its ``timeout`` bounds each socket operation, not the fetch, so
a server trickling one byte a second keeps the thread for minutes, and a thread cannot be
cancelled — abandoned fetches filled the default executor the policy watcher and reloads run
on. Here the whole fetch (name lookup, connect, TLS, headers, body) is a coroutine under one
deadline; cancelling it closes the connection. Name lookups run on a small executor of their
own, so even a hanging resolver cannot take threads from anything else.

Only what a key-document fetch needs: ``GET`` with ``Connection: close``, a bounded status line,
headers and body (``Content-Length``, chunked, or until close), and a few redirects.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3
MAX_HEADER_LINE = 8 << 10
MAX_HEADERS = 100
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class HttpGetError(Exception):
    """Why a GET failed, one line naming the URL."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class HttpGetter:
    """GETs with a total deadline, TLS verified against ``ssl_context``, bodies up to ``max_bytes``."""

    def __init__(self, ssl_context: ssl.SSLContext, max_bytes: int, resolver_threads: int = 2) -> None:
        self._ssl = ssl_context
        self._max_bytes = max_bytes
        self._resolver = ThreadPoolExecutor(resolver_threads, thread_name_prefix="jwks-resolve")

    async def get(self, url: str, deadline_s: float) -> Response:
        """The final response (redirects followed) of a 2xx GET; :class:`HttpGetError` otherwise."""
        try:
            async with asyncio.timeout(deadline_s):
                for _ in range(MAX_REDIRECTS + 1):
                    response = await self._once(url)
                    location = response.headers.get("location")
                    if response.status not in _REDIRECTS or not location:
                        break
                    url = urljoin(url, location)
                else:
                    raise HttpGetError(f"GET {url}: more than {MAX_REDIRECTS} redirects")
        except TimeoutError:
            raise HttpGetError(f"GET {url}: no complete response within {deadline_s:g}s") from None
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise HttpGetError(f"GET {url}: {_describe(exc)}") from None
        if not 200 <= response.status < 300:
            raise HttpGetError(f"GET {url}: HTTP {response.status}")
        return response

    async def _once(self, url: str) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HttpGetError(f"GET {url}: only http(s) URLs with a host can be fetched")
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        reader, writer = await self._connect(parts.hostname, port, secure)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            authority = parts.netloc.rpartition("@")[2]
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\n"
                "Accept-Encoding: identity\r\nConnection: close\r\nUser-Agent: authz-server\r\n\r\n".encode("ascii")
            )
            return await self._response(reader)
        finally:
            writer.transport.abort()

    async def _connect(self, host: str, port: int, secure: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        addresses = await self._resolve(host, port)
        error: OSError | None = None
        for address in addresses:
            try:
                return await asyncio.open_connection(
                    address, port, ssl=self._ssl if secure else None, server_hostname=host if secure else None,
                    limit=MAX_HEADER_LINE,
                )
            except OSError as exc:  # try the next address, as socket.create_connection does
                error = exc
        raise error or OSError(f"no address for {host}")

    async def _resolve(self, host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        infos = await loop.run_in_executor(self._resolver, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _response(self, reader: asyncio.StreamReader) -> Response:
        status_line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
        version, _, rest = status_line.partition(" ")
        code = rest.partition(" ")[0]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"not an HTTP/1 response: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
            if not line:
                break
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            raise ValueError(f"more than {MAX_HEADERS} response headers")
        return Response(int(code), headers, await self._body(reader, headers))

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await self._chunked(reader)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ValueError(f"invalid Content-Length {length[:40]!r}")
            self._check_size(int(length))
            return await reader.readexactly(int(length))
        body = bytearray()
        while len(body) <= self._max_bytes and (chunk := await reader.read(64 << 10)):
            body += chunk
        self._check_size(len(body))
        return bytes(body)

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        body = bytearray()
        while True:
            size_line = (await reader.readuntil(b"\n")).split(b";", 1)[0].strip()
            if not size_line or size_line.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"invalid chunk size {size_line[:20]!r}")
            size = int(size_line, 16)
            if size == 0:
                while (await reader.readuntil(b"\n")).strip():  # trailers
                    pass
                return bytes(body)
            self._check_size(len(body) + size)
            body += await reader.readexactly(size)
            await reader.readuntil(b"\n")

    def _check_size(self, size: int) -> None:
        if size > self._max_bytes:
            raise ValueError(f"response larger than {self._max_bytes} bytes")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed before the response was complete"
    if isinstance(exc, asyncio.LimitOverrunError):
        return f"response header line longer than {MAX_HEADER_LINE} bytes"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__
