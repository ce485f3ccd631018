"""A lean gRPC server for unary methods: HTTP/2 on asyncio, one thread, no per-call tasks.

Why: with grpcio a Check costs ~300 µs of server CPU before any policy work (its own threads,
completion-queue polling, 8-13 context switches per call — measured in loadtests/). Envoy only
ever makes unary calls here, so this server speaks exactly that: HTTP/2 framing and HPACK
(the ``hpack`` package) on an asyncio ``Protocol``; each request's handler coroutine is driven
inline and, as a Check normally never waits, answered within the same ``data_received`` call.
Responses are written once per batch of input.

Protocol notes: the server advertises ``SETTINGS_HEADER_TABLE_SIZE = 0`` so, once the peer has
acknowledged it, header blocks are stateless and repeated blocks are decoded from a cache. Flow
control is honoured both ways; streaming methods, compression and server push are not offered
(UNIMPLEMENTED / refused), except bidirectional calls answered message by message (reflection).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine

from hpack import Decoder, HPACKError

from authz_server.grpc_api import h2_frames as h2

log = logging.getLogger(__name__)

#: a unary method: request bytes -> response bytes (raises GrpcError for a non-OK status)
UnaryHandler = Callable[[bytes], Coroutine[Any, Any, bytes]]
#: a bidirectional-streaming method answered message by message: one response per request
#: message, synchronously (server reflection is the one such method served here)
MessageHandler = Callable[[bytes], bytes]

MAX_CONCURRENT_STREAMS = 1024
RECEIVE_WINDOW = 1 << 20  # per stream
CONNECTION_WINDOW = 16 << 20
MAX_MESSAGE_BYTES = 4 << 20
MAX_HEADER_BLOCK = 64 << 10
HEADER_CACHE_SIZE = 256


class GrpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class _Stream:
    path: str = ""
    body: bytearray = field(default_factory=bytearray)
    send_window: int = h2.DEFAULT_WINDOW
    #: outgoing frames in order, each with the flow-control window it needs (0 for HEADERS)
    outgoing: list[tuple[bytes, int]] = field(default_factory=list)
    #: the final frame (trailers) is queued: the stream ends when the queue drains
    finished: bool = False
    #: the response HEADERS frame has been queued (streaming responses send it once)
    started: bool = False
    closed_remote: bool = False


def _drive(coroutine: Coroutine[Any, Any, bytes]) -> tuple[bool, Any]:
    """Run a coroutine until it finishes or first waits: (done, result or the awaited future)."""
    try:
        return False, coroutine.send(None)
    except StopIteration as stop:
        return True, stop.value


async def _finish(coroutine: Coroutine[Any, Any, bytes], awaited: Any) -> bytes:
    """Continue a coroutine that :func:`_drive` started, as a Task would.

    Like ``Task.__step``: the future the coroutine yielded is marked as taken over
    (``_asyncio_future_blocking = False``) before waiting on it, then the coroutine resumes and
    reads the result (or the exception) itself.
    """
    while True:
        if awaited is None:
            await asyncio.sleep(0)
        else:
            awaited._asyncio_future_blocking = False
            try:
                await awaited
            except BaseException:
                if not awaited.done():  # this task itself was cancelled
                    coroutine.close()
                    raise
        try:
            awaited = coroutine.send(None)
        except StopIteration as stop:
            return stop.value


class _Connection(asyncio.Protocol):
    def __init__(self, server: FastGrpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface = False
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        self.decoder = Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        self.stateless_headers = False  # True once the peer acknowledged HEADER_TABLE_SIZE = 0
        self.header_cache: dict[bytes, list[tuple[str, str]]] = {}
        self.continuation: tuple[int, int, bytearray] | None = None  # (stream, flags, block)
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_initial_window = h2.DEFAULT_WINDOW
        self.peer_max_frame = h2.DEFAULT_MAX_FRAME
        self.received_unacked = 0
        self.out: list[bytes] = []
        self.in_flight = 0
        self.going_away = False

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.out.append(h2.settings_frame({
            h2.SETTINGS_HEADER_TABLE_SIZE: 0,
            h2.SETTINGS_ENABLE_PUSH: 0,
            h2.SETTINGS_MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            h2.SETTINGS_INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
            h2.SETTINGS_MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK,
        }))
        self.out.append(h2.window_update(0, CONNECTION_WINDOW - h2.DEFAULT_WINDOW))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.streams.clear()
        self.server.idle.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            self._process()
        except h2.ConnectionError_ as exc:
            log.warning("HTTP/2 connection error from peer: %s", exc)
            self.out.append(h2.goaway(self.last_stream, exc.code, str(exc).encode()[:200]))
            self._flush()
            if self.transport is not None:
                self.transport.close()
            return
        self._flush()

    # --- framing ----------------------------------------------------------------------------
    def _process(self) -> None:
        buffer = self.buffer
        if not self.preface:
            if len(buffer) < len(h2.PREFACE):
                if not h2.PREFACE.startswith(bytes(buffer)):
                    raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            if buffer[: len(h2.PREFACE)] != h2.PREFACE:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            del buffer[: len(h2.PREFACE)]
            self.preface = True
        offset = 0
        size = len(buffer)
        while size - offset >= 9:
            high, low, kind, flags, stream_id = h2.FRAME_HEADER.unpack_from(buffer, offset)
            length = (high << 8) | low
            if length > h2.DEFAULT_MAX_FRAME:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if size - offset - 9 < length:
                break
            payload = bytes(buffer[offset + 9: offset + 9 + length])
            offset += 9 + length
            self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
        if offset:
            del buffer[:offset]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is not None and kind != h2.CONTINUATION:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "expected CONTINUATION")
        if kind == h2.DATA:
            self._data(flags, stream_id, payload)
        elif kind == h2.HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == h2.CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == h2.SETTINGS:
            self._settings(flags, stream_id, payload)
        elif kind == h2.WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == h2.PING:
            if len(payload) != 8 or stream_id:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "bad PING")
            if not flags & h2.ACK:
                self.out.append(h2.frame(h2.PING, h2.ACK, 0, payload))
        elif kind == h2.RST_STREAM:
            self.streams.pop(stream_id, None)
        elif kind == h2.GOAWAY:
            self.going_away = True
        elif kind == h2.PUSH_PROMISE:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        self._consumed(len(payload))
        stream = self.streams.get(stream_id)
        if stream is None or stream.closed_remote:
            if stream_id == 0:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "DATA on stream 0")
            self.out.append(h2.rst_stream(stream_id, h2.STREAM_CLOSED))
            return
        if flags & h2.PADDED:
            payload = _unpad(payload)
        stream.body += payload
        if stream.path in self.server.streaming:
            self._stream_messages(stream_id, stream, bool(flags & h2.END_STREAM))
            return
        if len(stream.body) > MAX_MESSAGE_BYTES + 5:
            self.streams.pop(stream_id, None)
            self._respond_error(stream_id, h2.GRPC_RESOURCE_EXHAUSTED, f"request larger than {MAX_MESSAGE_BYTES} bytes")
            return
        if len(stream.body) > RECEIVE_WINDOW // 2 and not flags & h2.END_STREAM:
            self.out.append(h2.window_update(stream_id, len(payload)))
        if flags & h2.END_STREAM:
            stream.closed_remote = True
            self._dispatch(stream_id, stream)

    def _consumed(self, count: int) -> None:
        self.received_unacked += count
        if self.received_unacked >= CONNECTION_WINDOW // 2:
            self.out.append(h2.window_update(0, self.received_unacked))
            self.received_unacked = 0

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if flags & h2.PADDED:
            payload = _unpad(payload)
        if flags & h2.PRIORITY_FLAG:
            payload = payload[5:]
        if flags & h2.END_HEADERS:
            self._header_block(flags, stream_id, payload)
        else:
            self.continuation = (stream_id, flags, bytearray(payload))

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is None or self.continuation[0] != stream_id:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "unexpected CONTINUATION")
        sid, first_flags, block = self.continuation
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "header block too large")
        if flags & h2.END_HEADERS:
            self.continuation = None
            self._header_block(first_flags, sid, bytes(block))

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        cached = self.header_cache.get(block) if self.stateless_headers else None
        if cached is not None:
            return cached
        try:
            headers = self.decoder.decode(block)
        except (HPACKError, ValueError) as exc:
            raise h2.ConnectionError_(h2.COMPRESSION_ERROR, f"bad header block: {exc}") from None
        if self.stateless_headers and not self.decoder.header_table.dynamic_entries:
            if len(self.header_cache) >= HEADER_CACHE_SIZE:
                self.header_cache.clear()
            self.header_cache[block] = headers
        return headers

    def _header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        headers = self._decode(block)  # always decoded: keeps HPACK state in sync
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers from the client: nothing in them matters here
            if flags & h2.END_STREAM and not stream.closed_remote:
                stream.closed_remote = True
                self._dispatch(stream_id, stream)
            return
        if stream_id <= self.last_stream:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"stream {stream_id} reused or out of order")
        self.last_stream = stream_id
        if self.going_away or self.server.draining:
            self.out.append(h2.rst_stream(stream_id, h2.REFUSED_STREAM))
            return
        if len(self.streams) >= MAX_CONCURRENT_STREAMS:
            self.out.append(h2.rst_stream(stream_id, h2.REFUSED_STREAM))
            return
        stream = _Stream(send_window=self.peer_initial_window)
        for name, value in headers:
            if name == ":path":
                stream.path = value
        self.streams[stream_id] = stream
        if flags & h2.END_STREAM:
            stream.closed_remote = True
            self._dispatch(stream_id, stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2.ACK:
            # The peer now encodes for a zero-size table: blocks are stateless from here on.
            self.decoder.max_allowed_table_size = 0
            self.stateless_headers = True
            return
        if len(payload) % 6:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HL", payload, i)
            if key == h2.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > h2.MAX_WINDOW:
                    raise h2.ConnectionError_(h2.FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == h2.SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self.out.append(h2.frame(h2.SETTINGS, h2.ACK, 0))
        self._send_pending()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = struct.unpack(">L", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.send_window += increment
        elif (stream := self.streams.get(stream_id)) is not None:
            stream.send_window += increment
        self._send_pending()

    # --- requests and responses ---------------------------------------------------------------
    def _dispatch(self, stream_id: int, stream: _Stream) -> None:
        if stream.path in self.server.streaming:
            self._stream_messages(stream_id, stream, end=True)
            return
        handler = self.server.methods.get(stream.path)
        if handler is None:
            self._respond_error(stream_id, h2.GRPC_UNIMPLEMENTED, f"method {stream.path} is not served here")
            return
        try:
            message = h2.parse_grpc_message(bytes(stream.body))
        except ValueError as exc:
            self._respond_error(stream_id, h2.GRPC_INTERNAL, str(exc))
            return
        coroutine = handler(message)
        try:
            done, value = _drive(coroutine)
        except GrpcError as exc:
            self._respond_error(stream_id, exc.code, str(exc))
            return
        except Exception:  # noqa: BLE001 - one bad request must not end the connection
            log.exception("handler for %s failed", stream.path)
            self._respond_error(stream_id, h2.GRPC_INTERNAL, "internal error")
            return
        if done:
            self._respond(stream_id, value)
            return
        self.in_flight += 1
        task = asyncio.ensure_future(_finish(coroutine, value))
        task.add_done_callback(lambda t: self._finished(stream_id, t))

    def _finished(self, stream_id: int, task: asyncio.Future[bytes]) -> None:
        self.in_flight -= 1
        if task.cancelled():
            self._respond_error(stream_id, h2.GRPC_UNAVAILABLE, "server shutting down")
        elif isinstance(task.exception(), GrpcError):
            exc = task.exception()
            self._respond_error(stream_id, exc.code, str(exc))  # type: ignore[union-attr]
        elif task.exception() is not None:
            log.error("handler failed", exc_info=task.exception())
            self._respond_error(stream_id, h2.GRPC_INTERNAL, "internal error")
        else:
            self._respond(stream_id, task.result())
        self._flush()
        self.server.idle.set()

    def _data_frames(self, stream_id: int, payload: bytes) -> list[tuple[bytes, int]]:
        body = h2.grpc_message(payload)
        step = self.peer_max_frame
        return [(h2.frame(h2.DATA, 0, stream_id, body[i: i + step]), len(body[i: i + step]))
                for i in range(0, len(body), step)]

    def _respond(self, stream_id: int, payload: bytes) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:  # reset by the peer meanwhile
            return
        stream.outgoing.append((h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, h2.RESPONSE_HEADERS), 0))
        stream.outgoing.extend(self._data_frames(stream_id, payload))
        self._finish_stream(stream_id, stream)

    def _finish_stream(self, stream_id: int, stream: _Stream) -> None:
        stream.outgoing.append((h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream_id, h2.TRAILERS_OK), 0))
        stream.finished = True
        self._pump(stream_id, stream)

    def _pump(self, stream_id: int, stream: _Stream) -> None:
        """Send queued frames in order while both flow-control windows allow."""
        queue = stream.outgoing
        sent = 0
        for data, size in queue:
            if size and (size > self.send_window or size > stream.send_window):
                break
            self.send_window -= size
            stream.send_window -= size
            self.out.append(data)
            sent += 1
        del queue[:sent]
        if stream.finished and not queue:
            self.streams.pop(stream_id, None)

    def _send_pending(self) -> None:
        for stream_id, stream in list(self.streams.items()):
            if stream.outgoing:
                self._pump(stream_id, stream)

    def _stream_messages(self, stream_id: int, stream: _Stream, end: bool) -> None:
        """Answer every complete request message of a streaming call, then end with the client."""
        handler = self.server.streaming[stream.path]
        body = stream.body
        while len(body) >= 5:
            length = int.from_bytes(body[1:5], "big")
            if body[0] or length > MAX_MESSAGE_BYTES:
                self._respond_error(stream_id, h2.GRPC_INTERNAL, "compressed or oversized message")
                return
            if len(body) < 5 + length:
                break
            message = bytes(body[5: 5 + length])
            del body[: 5 + length]
            try:
                reply = handler(message)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the connection
                self._respond_error(stream_id, h2.GRPC_INTERNAL, f"{type(exc).__name__}: {exc}")
                return
            if not stream.started:
                stream.started = True
                stream.outgoing.append((h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, h2.RESPONSE_HEADERS), 0))
            stream.outgoing.extend(self._data_frames(stream_id, reply))
        if end:
            stream.closed_remote = True
            if not stream.started:
                stream.outgoing.append((h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, h2.RESPONSE_HEADERS), 0))
            self._finish_stream(stream_id, stream)
        else:
            self._pump(stream_id, stream)

    def _respond_error(self, stream_id: int, code: int, message: str) -> None:
        self.streams.pop(stream_id, None)
        self.out.append(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream_id,
                                 h2.trailers_only(code, message)))

    def _flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def go_away(self) -> None:
        """Tell the peer to open no new streams here (graceful shutdown)."""
        self.out.append(h2.goaway(self.last_stream, h2.NO_ERROR))
        self._flush()

    @property
    def busy(self) -> bool:
        return bool(self.streams) or self.in_flight > 0


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "padded frame without pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1: len(payload) - pad]


class FastGrpcServer:
    """Serves unary gRPC ``methods`` (path -> handler) on one address, SO_REUSEPORT for workers.

    ``streaming`` methods are answered message by message (one reply per request message).
    """

    def __init__(self, methods: dict[str, UnaryHandler], ssl_context: ssl.SSLContext | None = None,
                 streaming: dict[str, MessageHandler] | None = None) -> None:
        self.methods = methods
        self.streaming = streaming or {}
        self.ssl_context = ssl_context
        self.connections: set[_Connection] = set()
        self.draining = False
        self.idle = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None

    async def start(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), host, int(port), reuse_port=True, ssl=self.ssl_context, backlog=1024,
        )
        return self._server.sockets[0].getsockname()[1]

    async def stop(self, grace: float) -> None:
        """Stop accepting, GOAWAY every connection, let in-flight calls finish within ``grace``."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.go_away()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()


def unary(parse: Callable[[bytes], Any], call: Callable[[Any], Awaitable[Any]]) -> UnaryHandler:
    """Adapt ``call(message) -> message`` to a bytes handler (Diagnostics, health)."""
    async def handler(data: bytes) -> bytes:
        try:
            request = parse(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError subclasses
            raise GrpcError(h2.GRPC_INVALID_ARGUMENT, f"cannot parse request: {exc}") from None
        response = await call(request)
        return response.SerializeToString()
    return handler
