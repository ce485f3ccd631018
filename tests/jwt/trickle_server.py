"""A loopback HTTP server that answers one byte per interval: the slowest IdP a fetch can meet.

It counts connections opened and those the client closed while the answer was still trickling,
so a test can tell a fetch that gave up (and closed) from one left running in a thread.
"""

from __future__ import annotations

import socket
import threading
import time

RESPONSE = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"keys": []}'


class TrickleServer:
    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.opened = 0
        self.abandoned = 0
        self._thread = threading.Thread(target=self._accept, name="trickle", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> tuple[int, int]:
        """(connections opened, connections the client closed before the answer was complete)."""
        with self._lock:
            return self.opened, self.abandoned

    def __enter__(self) -> "TrickleServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.opened += 1
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(self.interval_s)
            try:
                connection.recv(65536)  # the request; its content does not matter
            except OSError:
                pass
            for byte in RESPONSE:
                if self._stop.wait(self.interval_s):
                    return
                try:
                    connection.sendall(bytes([byte]))
                    # A client that closed its end shows as EOF (or a reset) on our side.
                    connection.setblocking(False)
                    try:
                        if connection.recv(1) == b"":
                            raise ConnectionResetError
                    except BlockingIOError:
                        pass
                    finally:
                        connection.setblocking(True)
                        connection.settimeout(self.interval_s)
                except OSError:
                    with self._lock:
                        self.abandoned += 1
                    return


def wait_until(predicate, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
