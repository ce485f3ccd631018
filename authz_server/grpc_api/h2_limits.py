"""The serving limits: what one HTTP/2 connection, one request and one process may use.

Why: a peer that floods cheap frames, parks request bytes or never reads its answers must not
slow the other connections or grow the server's memory. The numbers follow what production
HTTP/2 servers ship (nghttp2, Go's ``x/net/http2``, grpc C-core); each is a setting
(:mod:`authz_server.settings`) with these defaults, applied by both serving layers where the
layer can express it. Exceeding a per-connection abuse limit closes the connection with
``GOAWAY(ENHANCE_YOUR_CALM)``, counts ``authz_http2_limit_exceeded_total{limit}`` and logs one
line, rate-limited (:class:`LimitReporter`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from authz_server.grpc_api import h2_frames as h2

log = logging.getLogger(__name__)

#: one log line per limit per this many seconds; the lines in between are counted, not printed
LOG_INTERVAL_SECONDS = 10.0
#: token buckets hold this many seconds of their rate (nghttp2: 1000 resets at 33/s)
BURST_SECONDS = 30


@dataclass(frozen=True)
class Http2Limits:
    """Every bound the serving layers enforce (0 disables the timeouts, never a size)."""

    #: largest request message. Envoy's CheckRequest carries the HTTP headers (Envoy's default
    #: ``max_request_headers_kb`` is 60 KiB) and, with ``includeRequestBodyInCheck``, up to
    #: ``maxRequestBytes`` of body: raise this above that body size when you include bodies.
    max_message_bytes: int = 256 << 10
    #: concurrent streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS)
    max_concurrent_streams: int = 256
    #: decoded request header list (HPACK size: name + value + 32 per field), grpc C-core's hard limit
    max_header_list_bytes: int = 16 << 10
    #: request bytes a connection may have buffered and not yet handed to a handler (its window)
    connection_buffer_bytes: int = 1 << 20
    #: request bytes all connections of this process may have buffered together
    process_buffer_bytes: int = 64 << 20
    #: connections per worker process; more are answered GOAWAY and closed
    max_connections: int = 1024
    #: seconds without a request frame or a pending answer before a connection is closed (0 = never)
    idle_timeout: float = 300.0
    #: keepalive enforcement as grpc's: PINGs closer together than this, with no new request in
    #: between, are strikes; more than ``max_ping_strikes`` close the connection
    min_ping_interval: float = 300.0
    max_ping_strikes: int = 2
    #: control-frame replies (PING/SETTINGS ACK, RST_STREAM) queued but not yet taken by the peer
    max_control_frames: int = 1000
    #: RST_STREAM of open streams per second (rapid reset), sustained; bursts of 30 s worth
    max_resets_per_second: float = 33.0
    #: CONTINUATION frames in one header block
    max_continuations: int = 8
    #: frames that do no work per second (unknown types, PRIORITY, empty DATA/CONTINUATION,
    #: repeated SETTINGS, frames on closed streams), sustained; bursts of 30 s worth
    max_glitches_per_second: float = 330.0

    @property
    def stream_window(self) -> int:
        """Per-stream receive window: one whole message fits, so unary calls need no updates."""
        return min(h2.MAX_WINDOW, max(h2.DEFAULT_WINDOW, self.max_message_bytes + 5 + h2.DEFAULT_MAX_FRAME))

    @property
    def connection_window(self) -> int:
        """Connection receive window = the per-connection buffer (at least one stream's window)."""
        return min(h2.MAX_WINDOW, max(self.connection_buffer_bytes, self.stream_window))


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; :meth:`take` is False when empty."""

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic
    tokens: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = self.burst
        self.updated = self.clock()

    @classmethod
    def per_second(cls, rate: float, clock: Callable[[], float] = time.monotonic) -> TokenBucket:
        return cls(rate, max(1.0, rate * BURST_SECONDS), clock)

    def take(self) -> bool:
        if self.tokens >= 1.0:  # the common case: no clock read
            self.tokens -= 1.0
            return True
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class LimitExceeded(h2.ConnectionError_):
    """A per-connection limit was exceeded: GOAWAY(ENHANCE_YOUR_CALM), count it, close."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(h2.ENHANCE_YOUR_CALM, message)
        self.limit = limit


class LimitReporter:
    """Counts every exceeded limit and logs at most one line per limit per interval."""

    def __init__(self, count: Callable[[str], None], interval: float = LOG_INTERVAL_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, limit: str, peer: str, detail: str) -> None:
        """A limit closed a connection (or refused one): count it, log it (rate-limited)."""
        self.count(limit)
        self.note(limit, f"closing HTTP/2 connection from {peer}: {detail}")

    def note(self, key: str, message: str) -> None:
        """Log ``message`` unless a line of the same ``key`` went out less than an interval ago."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        more = self._suppressed.pop(key, 0)
        log.warning("%s%s", message, f" ({more} more like it since the last such line)" if more else "")
