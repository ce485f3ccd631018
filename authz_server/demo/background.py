"""A stdlib HTTP server on a background thread, as a context manager (echo app, local IdP)."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from typing import TypeVar

Self = TypeVar("Self", bound="BackgroundServer")


class BackgroundServer:
    """Owns ``server`` and the thread serving it; ``port`` is the bound port (0 picks a free one)."""

    def __init__(self, server: ThreadingHTTPServer, thread_name: str) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name=thread_name, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self: Self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self: Self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
