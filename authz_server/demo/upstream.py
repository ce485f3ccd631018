"""A sample upstream app that echoes what reached it.

Every request gets ``200`` and a JSON body with the app's name, the method, the path and the request
headers (lower-case names), so a test can assert which headers the proxies and the authz server's
``ok_response`` put on the way — ``x-forwarded-client-cert``, ``x-forwarded-for``, injected headers.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Sequence

from authz_server.demo.background import BackgroundServer

_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every method alike; HTTP/1.1 keep-alive so Envoy can pool connections."""

    protocol_version = "HTTP/1.1"
    server: "_EchoServer"

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(
            {
                "name": self.server.name,
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body_bytes": len(body),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Quiet by default: the proxies' access logs already record each request."""


for _method in _METHODS:
    setattr(_EchoHandler, f"do_{_method}", _EchoHandler._echo)


class _EchoServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, name: str) -> None:
        super().__init__((host, port), _EchoHandler)
        self.name = name


class EchoUpstream(BackgroundServer):
    """The echo app on a background thread; ``port=0`` picks a free port (see :attr:`port`)."""

    def __init__(self, name: str = "upstream", host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(_EchoServer(host, port, name), f"echo-{name}")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m authz_server.demo.upstream --port N --name NAME``: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="upstream")
    args = parser.parse_args(argv)
    server = _EchoServer(args.host, args.port, args.name)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
