"""The operator's HTTP port: ``/metrics``, ``/healthz`` (alive) and ``/readyz`` (ready to decide).

It runs in a daemon thread with the standard library's HTTP server, off the event loop that
answers Checks, so a slow scrape never delays a decision.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from authz_server.startup import StartupError

log = logging.getLogger(__name__)

#: returns (ready, why-not); evaluated on every /readyz request
Readiness = Callable[[], tuple[bool, str]]


def _starting() -> tuple[bool, str]:
    return False, "starting"


class OpsEndpoint:
    def __init__(self, listen: str, registry: CollectorRegistry, ready: Readiness = _starting,
                 alive: Callable[[], bool] = lambda: True) -> None:
        host, _, port = listen.rpartition(":")
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(endpoint.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = endpoint.alive()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"not alive\n")
                elif path == "/readyz":
                    ok, why = endpoint.ready()
                    self._reply(200 if ok else 503, (f"{'ready' if ok else 'not ready'}: {why}\n").encode())
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                log.debug("ops http: " + format, *args)

        self.registry = registry
        self.ready = ready
        self.alive = alive
        self.server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="ops-http", daemon=True)

    @classmethod
    def bind(cls, listen: str, registry: CollectorRegistry, ready: Readiness = _starting,
             alive: Callable[[], bool] = lambda: True) -> OpsEndpoint:
        """Bind ``listen`` (``--metrics-listen``) now; a busy address is a :class:`StartupError`."""
        try:
            return cls(listen, registry, ready, alive)
        except OSError as exc:
            raise StartupError(f"--metrics-listen {listen}: cannot bind: {exc.strerror or exc}; choose a free "
                               "address (AUTHZ_METRICS_LISTEN) or 'off'") from None

    def attach(self, ready: Readiness) -> None:
        """Answer /readyz from ``ready`` (the server's parts exist only after the port is bound)."""
        self.ready = ready

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health on http://%s:%d (/metrics /healthz /readyz)", *self.server.server_address[:2])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
