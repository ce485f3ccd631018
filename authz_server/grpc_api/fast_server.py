"""A lean gRPC server for unary methods: HTTP/2 on asyncio, one thread, no per-call tasks.

Why: with grpcio a Check costs ~300 µs of server CPU before any policy work (its own threads,
completion-queue polling, 8-13 context switches per call — measured in loadtests/). Envoy only
ever makes unary calls here, so this server speaks exactly that: HTTP/2 framing and HPACK
(the ``hpack`` package) on an asyncio ``Protocol``; each request's handler coroutine is driven
inline and, as a Check normally never waits, answered within the same ``data_received`` call.
Responses are written once per batch of input.

Protocol notes: the server advertises ``SETTINGS_HEADER_TABLE_SIZE = 0`` so, once the peer has
acknowledged it, header blocks are stateless and repeated blocks (with their checked request
head) are decoded from a small per-connection cache. Flow control is honoured both ways;
streaming methods, compression and server push are not offered (UNIMPLEMENTED / refused), except
bidirectional calls answered message by message (reflection).

Hostile peers (limits in :class:`~authz_server.grpc_api.h2_limits.Http2Limits`):

* fairness — at most :data:`FRAMES_PER_TURN` frames of one connection per event-loop turn (the
  rest waits, reading paused, for the next turn), and no reading while the connection's write
  buffer is above its high-water mark (``pause_writing``), so a peer that does not read its
  answers stops being read;
* memory — connection credit is returned only for bytes handed to a handler (or discarded), so
  a connection buffers at most its window; the process total is capped too; the header cache
  is bounded in bytes; a message over the limit is answered RESOURCE_EXHAUSTED at once,
  followed by RST_STREAM(NO_ERROR), and the rest discarded;
* abuse — queued control replies, stream resets per second, CONTINUATIONs per block, frames
  that do no work, PINGs without requests (grpc's keepalive enforcement): GOAWAY
  ENHANCE_YOUR_CALM and close;
* connections — a per-process cap, an idle timeout, and a two-phase GOAWAY drain (2^31-1 and a
  PING, then the last stream id once the PING comes back) so no request in flight is refused.

Overload (:mod:`~authz_server.grpc_api.admission`): every call's ``grpc-timeout`` gives it a
deadline from its arrival (the read that brought its HEADERS). The methods named ``queued``
(Check) go through the worker's run queue: taken on or refused at once (RESOURCE_EXHAUSTED) when
their request is complete, then evaluated oldest first in slices of :data:`QUEUE_SLICE` seconds,
between which every connection is read again — so a Check's age is known when it is read, not
hidden in socket buffers, and one whose deadline has passed is answered DEADLINE_EXCEEDED without
being evaluated (cheaply: expired Checks never delay the fresh ones behind them). When nothing is
queued the queue is run at once, within the read: the hot path stays one ``data_received``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Coroutine

from hpack import Decoder, HPACKError, OversizedHeaderListError

from authz_server.grpc_api import admission as adm
from authz_server.grpc_api import h2_frames as h2
from authz_server.grpc_api.h2_limits import Http2Limits, LimitExceeded, LimitReporter, TokenBucket
from authz_server.grpc_api.h2_requests import Headers, RequestHead, Refusal, request_head

log = logging.getLogger(__name__)

#: a unary method: (request bytes, the request's decoded header list — read-only, shared with
#: the header cache) -> response bytes (raises GrpcError for a non-OK status); the headers carry
#: the call's metadata (Check reads the proxy's x-authz-*)
UnaryHandler = Callable[[bytes, Headers], Coroutine[Any, Any, bytes]]
#: a bidirectional-streaming method answered message by message: one response per request
#: message, synchronously (server reflection is the one such method served here)
MessageHandler = Callable[[bytes], bytes]

#: work units of one connection handled per event-loop turn before the others get the loop:
#: a frame is one unit, a request handed to its handler DISPATCH_COST more, a header block
#: decoded (not cached) one per HEADER_BYTES_PER_UNIT bytes — what makes a turn long
FRAMES_PER_TURN = 256
DISPATCH_COST = 4
HEADER_BYTES_PER_UNIT = 64
#: write buffer marks: above HIGH the connection is not read until it drains below LOW
WRITE_HIGH_WATER = 128 << 10
WRITE_LOW_WATER = 32 << 10
#: decoded header blocks kept per connection (bytes, estimated) and the largest block cached
HEADER_CACHE_BYTES = 32 << 10
HEADER_CACHE_MAX_BLOCK = 4 << 10
#: streams we reset or answered early whose late frames are dropped silently (RFC 9113 §5.1)
RECENT_RESETS = 64
#: more entries in one SETTINGS frame is abuse (nghttp2's limit)
MAX_SETTINGS_ENTRIES = 32
#: drain: the PING that follows GOAWAY(2^31-1); without its ACK the final GOAWAY goes after this
DRAIN_PING = b"drain\x00\x00\x00"
DRAIN_PING_TIMEOUT = 1.0
#: a closed connection whose peer neither reads its last frames nor closes is aborted after this long
CLOSE_LINGER = 2.0
#: seconds of queued work evaluated before every connection is read again (at least one call)
QUEUE_SLICE = 0.005
#: weight of the latest evaluation in the moving average of the cost per queued call
COST_WEIGHT = 0.1
NO_DEADLINE = float("inf")


class GrpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Expired(Exception):
    """A waiting call's deadline passed before it could go on: it is not resumed."""


@dataclass(slots=True)
class _Stream:
    path: str
    #: the request's decoded header list (shared with the header cache: never mutate)
    headers: Headers
    handler: UnaryHandler | None
    streaming: MessageHandler | None
    recv_window: int
    send_window: int
    body: bytearray = field(default_factory=bytearray)
    #: body bytes held against the connection and process buffers (credit not yet returned)
    buffered: int = 0
    #: outgoing frames in order, each with the flow-control window it needs (0 for HEADERS)
    outgoing: list[tuple[bytes, int]] = field(default_factory=list)
    #: the final frame (trailers) is queued: the stream ends when the queue drains
    finished: bool = False
    #: the response HEADERS frame has been queued (streaming responses send it once)
    started: bool = False
    closed_remote: bool = False
    prefix_checked: bool = False
    #: the server clock's time by which the client wants the answer (its grpc-timeout)
    deadline: float = NO_DEADLINE
    #: taken on by the admission control (counted in ``Admission.pending`` until answered)
    admitted: bool = False
    #: a call waiting (on a JWKS fetch): its task, and the timer that stops it at the deadline
    task: asyncio.Future[bytes] | None = None
    timer: asyncio.TimerHandle | None = None
    expired: bool = False


@dataclass(slots=True)
class _Block:
    """A decoded header block and, once needed, its checked request head."""

    headers: Headers
    head: RequestHead | None = None


def _drive(coroutine: Coroutine[Any, Any, bytes]) -> tuple[bool, Any]:
    """Run a coroutine until it finishes or first waits: (done, result or the awaited future).

    Like ``Task.__step``, the future it yielded is marked as taken over at once
    (``_asyncio_future_blocking = False``): another call of the same read may await the same
    future (Checks waiting on one JWKS fetch) before :func:`_finish` runs.
    """
    try:
        awaited = coroutine.send(None)
    except StopIteration as stop:
        return True, stop.value
    if awaited is not None:
        awaited._asyncio_future_blocking = False
    return False, awaited


async def _finish(coroutine: Coroutine[Any, Any, bytes], awaited: Any, deadline: float,
                  clock: Callable[[], float]) -> bytes:
    """Continue a coroutine that :func:`_drive` started, as a Task would.

    Like ``Task.__step``: it waits on the future the coroutine yielded (taken over by
    :func:`_drive` or the previous step), then the coroutine resumes and reads the result (or
    the exception) itself — unless its deadline has passed meanwhile: then
    it is closed, not resumed (:class:`_Expired`), so waiters woken together (by one JWKS fetch)
    spend nothing on those the client has given up on.
    """
    while True:
        if awaited is None:
            await asyncio.sleep(0)
        else:
            try:
                await awaited
            except BaseException:
                if not awaited.done():  # this task itself was cancelled
                    coroutine.close()
                    raise
        if clock() >= deadline:
            coroutine.close()
            raise _Expired
        try:
            awaited = coroutine.send(None)
        except StopIteration as stop:
            return stop.value
        if awaited is not None:
            awaited._asyncio_future_blocking = False


class _Connection(asyncio.Protocol):
    def __init__(self, server: FastGrpcServer) -> None:
        self.server = server
        self.limits = limits = server.limits
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown peer"
        self.closed = False
        self.buffer = bytearray()
        self.preface = False
        self.got_settings = False
        self.settings_acked = False
        self.streams: dict[int, _Stream] = {}
        #: streams whose queued answer waits for the peer's flow-control window, in order
        self.blocked: dict[int, _Stream] = {}
        self.last_stream = 0
        self.recent_resets: deque[int] = deque(maxlen=RECENT_RESETS)
        self.decoder = Decoder()
        # Twice the advertised limit: lists between the two get an HTTP 431, larger ones end the
        # connection (as Go does), and decoding stops as soon as the list passes it.
        self.decoder.max_header_list_size = 2 * limits.max_header_list_bytes
        self.stateless_headers = False  # True once the peer acknowledged HEADER_TABLE_SIZE = 0
        self.header_cache: dict[bytes, _Block] = {}
        self.header_cache_bytes = 0
        #: a header block awaiting CONTINUATION: (stream, flags, block, frames, stream error or 0)
        self.continuation: tuple[int, int, bytearray, int, int] | None = None
        self.send_window = h2.DEFAULT_WINDOW
        self.peer_initial_window = h2.DEFAULT_WINDOW
        self.peer_max_frame = h2.DEFAULT_MAX_FRAME
        self.stream_window = limits.stream_window
        self.max_body = limits.max_message_bytes + 5
        #: receive credit the peer still has on the connection, and credit to return
        self.recv_window = limits.connection_window
        self.credit_due = 0
        self.credit_threshold = limits.connection_window // 2
        self.out: list[bytes] = []
        #: control replies in ``out`` this turn, and written earlier but maybe still buffered
        self.control_turn = 0
        self.control_buffered = 0
        self.in_flight = 0
        self.resets = TokenBucket.per_second(limits.max_resets_per_second)
        self.glitches = TokenBucket.per_second(limits.max_glitches_per_second)
        self.ping_strikes = 0
        self.last_ping = float("-inf")
        self.streams_at_last_ping = 0
        #: request frames seen (HEADERS, DATA) and the count at the last idle sweep
        self.activity = 0
        self.activity_seen = 0
        self.idle_for = 0.0
        self.backlog = False
        #: work done this turn beyond one unit per frame (see FRAMES_PER_TURN)
        self.turn_cost = 0
        self.write_paused = False
        self.reading = True
        #: 0 serving, 1 GOAWAY(2^31-1) + PING sent, 2 final GOAWAY sent
        self.drain_stage = 0
        self.goaway_last = h2.MAX_STREAM_ID
        self.drain_timer: asyncio.TimerHandle | None = None
        #: when the input being handled was read (server clock): the arrival of its calls
        self.read_at = server.clock()

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        limits = self.limits
        self.out.append(h2.settings_frame({
            h2.SETTINGS_HEADER_TABLE_SIZE: 0,
            h2.SETTINGS_ENABLE_PUSH: 0,
            h2.SETTINGS_MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            h2.SETTINGS_INITIAL_WINDOW_SIZE: self.stream_window,
            h2.SETTINGS_MAX_HEADER_LIST_SIZE: limits.max_header_list_bytes,
        }))
        if len(self.server.connections) >= limits.max_connections:
            self._fail(LimitExceeded("connections", f"more than {limits.max_connections} connections"))
            return
        self.server.connections.add(self)
        if limits.connection_window > h2.DEFAULT_WINDOW:
            self.out.append(h2.window_update(0, limits.connection_window - h2.DEFAULT_WINDOW))
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for stream in self.streams.values():
            self.server.buffered -= stream.buffered
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self.blocked.clear()
        if self.drain_timer is not None:
            self.drain_timer.cancel()
        self.server.changed.set()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.read_at = self.server.clock()
        self.buffer += data
        self._run()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.backlog:
            self.loop.call_soon(self._continue)
        else:
            self._update_reading()

    # --- fairness -------------------------------------------------------------------------------
    def _run(self) -> None:
        """Handle this turn's share of the input; a protocol error ends the connection."""
        server = self.server
        try:
            self._process()
        except h2.ConnectionError_ as exc:
            self._fail(exc)
            return
        finally:
            if server.queue and not server.queue_scheduled:
                server.run_queue()  # nothing was waiting before this read: answer within it
        self._flush()
        if self.drain_stage == 2:
            self._close_if_drained()

    def _defer(self) -> None:
        """This turn's frame budget is spent: stop reading, continue on a later turn."""
        self.backlog = True
        if not self.write_paused:
            self.loop.call_soon(self._continue)
        self._update_reading()

    def _continue(self) -> None:
        if self.closed or not self.backlog or self.write_paused:
            return  # resume_writing reschedules a backlog held up by a full write buffer
        self.backlog = False
        self._run()
        self._update_reading()

    def _update_reading(self) -> None:
        """Read only while there is no backlog and the write buffer is below its high-water mark."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = not (self.backlog or self.write_paused)
        if want != self.reading:
            self.reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

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
        if not self.got_settings and len(buffer) >= 9 and buffer[3] != h2.SETTINGS:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "the connection preface must end with SETTINGS")
        offset = 0
        size = len(buffer)
        budget = FRAMES_PER_TURN
        self.turn_cost = 0
        while size - offset >= 9:
            if budget <= self.turn_cost:
                self._defer()
                break
            high, low, kind, flags, stream_id = h2.FRAME_HEADER.unpack_from(buffer, offset)
            length = (high << 8) | low
            if length > h2.DEFAULT_MAX_FRAME:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, f"frame of {length} bytes")
            if size - offset - 9 < length:
                break
            payload = bytes(buffer[offset + 9: offset + 9 + length])
            offset += 9 + length
            budget -= 1
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
            self._ping(flags, stream_id, payload)
        elif kind == h2.RST_STREAM:
            self._rst_stream(stream_id, payload)
        elif kind == h2.PRIORITY:
            self._priority(stream_id, payload)
        elif kind == h2.GOAWAY:
            if stream_id:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            self.begin_drain()  # the peer is leaving: finish what it sent, then close (as Go does)
        elif kind == h2.PUSH_PROMISE:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:  # unknown frame types are ignored, as RFC 9113 requires, but they do no work
            self._glitch("frames of unknown types")

    def _glitch(self, what: str) -> None:
        """Count a frame that does no work; too many per second end the connection."""
        if not self.glitches.take():
            raise LimitExceeded("glitches", f"too many frames that do no work ({what}; "
                                f"more than {self.limits.max_glitches_per_second:g}/s sustained)")

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        if length > self.recv_window:
            raise h2.ConnectionError_(h2.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= length
        self.activity += 1
        stream = self.streams.get(stream_id)
        if stream is None or stream.closed_remote:
            self._credit(length)  # never consumed: the credit goes back at once
            self._data_on_closed(stream_id, stream)
            return
        if length > stream.recv_window:
            self._credit(length)
            self._reset(stream_id, h2.FLOW_CONTROL_ERROR)
            return
        stream.recv_window -= length
        if flags & h2.PADDED:
            payload = _unpad(payload)
            self._credit(length - len(payload))
        elif not length and not flags & h2.END_STREAM:
            self._glitch("empty DATA frames")
        count = len(payload)
        server = self.server
        if server.buffered + count > self.limits.process_buffer_bytes:
            self._credit(count)
            self._respond_error(stream_id, h2.GRPC_RESOURCE_EXHAUSTED, "the server is buffering too many request bytes")
            return
        body = stream.body
        body += payload
        stream.buffered += count
        server.buffered += count
        if stream.streaming is not None:
            self._stream_messages(stream_id, stream, bool(flags & h2.END_STREAM))
            return
        if len(body) > self.max_body:
            self._respond_error(stream_id, h2.GRPC_RESOURCE_EXHAUSTED,
                                f"request larger than {self.limits.max_message_bytes} bytes")
            return
        if flags & h2.END_STREAM:
            stream.closed_remote = True
            self._dispatch(stream_id, stream)
        elif not stream.prefix_checked and len(body) >= 5:
            stream.prefix_checked = True
            if struct.unpack_from(">L", body, 1)[0] > self.limits.max_message_bytes:  # answer now
                self._respond_error(stream_id, h2.GRPC_RESOURCE_EXHAUSTED,
                                    f"request larger than {self.limits.max_message_bytes} bytes")

    def _data_on_closed(self, stream_id: int, stream: _Stream | None) -> None:
        if stream_id == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "DATA on stream 0")
        if stream_id > self.last_stream:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
        if stream is not None:  # half-closed (remote): RFC 9113 §5.1 stream error STREAM_CLOSED
            self._reset(stream_id, h2.STREAM_CLOSED)
        elif stream_id not in self.recent_resets:  # §6.1: not open: STREAM_CLOSED
            self._glitch("DATA on closed streams")
            self._reset(stream_id, h2.STREAM_CLOSED)

    def _credit(self, count: int) -> None:
        """Give ``count`` bytes of connection credit back (batched into one WINDOW_UPDATE)."""
        due = self.credit_due + count
        if due >= self.credit_threshold:
            self.out.append(h2.window_update(0, due))
            self.recv_window += due
            due = 0
        self.credit_due = due

    def _release(self, stream: _Stream, count: int | None = None) -> None:
        """The stream's buffered bytes were handed on or dropped: free them, return the credit."""
        count = stream.buffered if count is None else count
        if count:
            stream.buffered -= count
            self.server.buffered -= count
            self._credit(count)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        self.activity += 1
        if flags & h2.PADDED:
            payload = _unpad(payload)
        error = 0
        if flags & h2.PRIORITY_FLAG:
            if len(payload) < 5:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "HEADERS too short for its priority fields")
            if struct.unpack_from(">L", payload)[0] & 0x7FFFFFFF == stream_id:
                error = h2.PROTOCOL_ERROR  # RFC 9113 §5.3.1: a stream cannot depend on itself
            payload = payload[5:]
        if flags & h2.END_HEADERS:
            self._header_block(flags, stream_id, payload, error)
        else:
            self._check_block_size(len(payload))
            self.continuation = (stream_id, flags, bytearray(payload), 0, error)

    def _check_block_size(self, size: int) -> None:
        if size > 2 * self.limits.max_header_list_bytes:
            raise LimitExceeded("header_list", f"a header block over {2 * self.limits.max_header_list_bytes} bytes")

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continuation is None or self.continuation[0] != stream_id:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "unexpected CONTINUATION")
        _, first_flags, block, frames, error = self.continuation
        frames += 1
        if frames > self.limits.max_continuations:
            raise LimitExceeded("continuations", f"more than {self.limits.max_continuations} CONTINUATION frames "
                                "in one header block")
        if not payload and not flags & h2.END_HEADERS:
            self._glitch("empty CONTINUATION frames")
        block += payload
        self._check_block_size(len(block))
        if flags & h2.END_HEADERS:
            self.continuation = None
            self._header_block(first_flags, stream_id, bytes(block), error)
        else:
            self.continuation = (stream_id, first_flags, block, frames, error)

    def _decode(self, block: bytes) -> _Block:
        if self.stateless_headers:
            cached = self.header_cache.get(block)
            if cached is not None:
                return cached
        try:
            headers = self.decoder.decode(block)
        except OversizedHeaderListError:
            raise LimitExceeded("header_list", f"a header list over {2 * self.limits.max_header_list_bytes} bytes") \
                from None
        except (HPACKError, ValueError) as exc:
            raise h2.ConnectionError_(h2.COMPRESSION_ERROR, f"bad header block: {exc}") from None
        self.turn_cost += len(block) // HEADER_BYTES_PER_UNIT
        entry = _Block(headers)
        if self.stateless_headers and len(block) <= HEADER_CACHE_MAX_BLOCK \
                and not self.decoder.header_table.dynamic_entries:
            cost = 3 * len(block) + 256  # the key, the decoded strings and their tuples, roughly
            if self.header_cache_bytes + cost > HEADER_CACHE_BYTES:
                self.header_cache.clear()
                self.header_cache_bytes = 0
            self.header_cache[block] = entry
            self.header_cache_bytes += cost
        return entry

    def _header_block(self, flags: int, stream_id: int, block: bytes, error: int = 0) -> None:
        entry = self._decode(block)  # always decoded: keeps HPACK state in sync
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._trailers(flags, stream_id, stream, entry.headers)
            return
        if stream_id <= self.last_stream:
            if stream_id in self.recent_resets:
                return  # trailers of a stream answered early: RFC 9113 §5.1 says ignore them
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"stream {stream_id} reused or out of order")
        self.last_stream = stream_id
        if error:
            self._reset(stream_id, error)
            return
        if stream_id > self.goaway_last:  # opened after the final GOAWAY: safe for the peer to retry
            self._reset(stream_id, h2.REFUSED_STREAM)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self._glitch("streams over SETTINGS_MAX_CONCURRENT_STREAMS")
            self._reset(stream_id, h2.REFUSED_STREAM)
            return
        head = entry.head
        if head is None:
            head = entry.head = request_head(entry.headers, self.limits.max_header_list_bytes)
        if head.malformed is not None:
            self._reset(stream_id, h2.PROTOCOL_ERROR)
            return
        server = self.server
        handler = server.methods.get(head.path)
        streaming = server.streaming.get(head.path) if handler is None else None
        stream = _Stream(head.path, head.headers, handler, streaming, self.stream_window, self.peer_initial_window)
        if head.timeout is not None:
            stream.deadline = self.read_at + head.timeout
        stream.closed_remote = bool(flags & h2.END_STREAM)
        self.streams[stream_id] = stream
        refusal = head.refusal
        if refusal is None and handler is None and streaming is None:
            refusal = Refusal(200, h2.GRPC_UNIMPLEMENTED, f"method {head.path} is not served here")
        if refusal is not None:
            self._respond_error(stream_id, refusal.grpc_code, refusal.message, refusal.http_status)
        elif stream.closed_remote:
            self._dispatch(stream_id, stream)

    def _trailers(self, flags: int, stream_id: int, stream: _Stream, headers: Headers) -> None:
        if stream.closed_remote:  # RFC 9113 §5.1: half-closed (remote)
            self._reset(stream_id, h2.STREAM_CLOSED)
        elif not flags & h2.END_STREAM or any(name.startswith(":") for name, _ in headers):
            self._reset(stream_id, h2.PROTOCOL_ERROR)  # §8.1: malformed trailers
        else:  # nothing in a request's trailers matters here
            stream.closed_remote = True
            self._dispatch(stream_id, stream)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & h2.ACK:
            if payload:
                raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            if self.settings_acked:
                self._glitch("unsolicited SETTINGS ACKs")
            # The peer now encodes for a zero-size table: blocks are stateless from here on.
            self.settings_acked = True
            self.decoder.max_allowed_table_size = 0
            self.stateless_headers = True
            return
        if self.got_settings:
            self._glitch("repeated SETTINGS frames")
        self.got_settings = True
        settings = h2.parse_settings(payload)
        if len(settings) > MAX_SETTINGS_ENTRIES:
            raise LimitExceeded("settings", f"more than {MAX_SETTINGS_ENTRIES} entries in one SETTINGS frame")
        for key, value in settings:
            if key == h2.SETTINGS_INITIAL_WINDOW_SIZE:
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > h2.MAX_WINDOW:  # RFC 9113 §6.9.2
                        raise h2.ConnectionError_(h2.FLOW_CONTROL_ERROR, "a stream window above 2^31-1")
            elif key == h2.SETTINGS_MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self._control(h2.frame(h2.SETTINGS, h2.ACK, 0))
        self._send_blocked()

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = struct.unpack(">L", payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if not increment:
                raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self.send_window += increment
            if self.send_window > h2.MAX_WINDOW:
                raise h2.ConnectionError_(h2.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._send_blocked()
            return
        if stream_id > self.last_stream:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # closed: RFC 9113 §6.9 lets these arrive for a while
        if not increment:
            self._reset(stream_id, h2.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > h2.MAX_WINDOW:
            self._reset(stream_id, h2.FLOW_CONTROL_ERROR)
            return
        if stream.outgoing:
            self._pump(stream_id, stream)

    def _ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 8:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "PING not 8 bytes")
        if stream_id:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "PING on a stream")
        if flags & h2.ACK:
            if payload == DRAIN_PING and self.drain_stage == 1:
                self._final_goaway()
            else:
                self._glitch("unsolicited PING ACKs")
            return
        self._enforce_ping_interval()
        self._control(h2.ping(payload, ack=True))

    def _enforce_ping_interval(self) -> None:
        """grpc's keepalive enforcement: PINGs too close together without requests are strikes."""
        interval = self.limits.min_ping_interval
        now = self.loop.time()
        if self.last_stream != self.streams_at_last_ping:
            self.ping_strikes = 0  # a request since the last PING: the peer is not just pinging
        elif interval and now - self.last_ping < interval:
            self.ping_strikes += 1
            if self.ping_strikes > self.limits.max_ping_strikes:
                raise LimitExceeded("pings", f"too_many_pings: PINGs more often than every {interval:g}s "
                                    "without a request in between")
        self.last_ping = now
        self.streams_at_last_ping = self.last_stream

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if stream_id == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if stream_id > self.last_stream:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            self._glitch("RST_STREAM on closed streams")
            return
        self.blocked.pop(stream_id, None)
        self._release(stream)
        if stream.task is not None:  # the client gave up (Envoy does at its timeout): stop waiting
            stream.expired = True
            stream.task.cancel()
        if not self.resets.take():
            raise LimitExceeded("resets", f"rapid reset: more than {self.limits.max_resets_per_second:g} "
                                "RST_STREAM per second sustained")

    def _priority(self, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise h2.ConnectionError_(h2.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            raise h2.ConnectionError_(h2.FRAME_SIZE_ERROR, "PRIORITY not 5 bytes")
        self._glitch("PRIORITY frames")  # RFC 9113 deprecates them; nothing here uses them
        if struct.unpack_from(">L", payload)[0] & 0x7FFFFFFF == stream_id:
            self._reset(stream_id, h2.PROTOCOL_ERROR)

    # --- requests and responses ---------------------------------------------------------------
    def _dispatch(self, stream_id: int, stream: _Stream) -> None:
        """The request is complete: evaluate it now, or (``queued`` methods) take it on or refuse it."""
        if stream.streaming is not None:
            self._stream_messages(stream_id, stream, end=True)
            return
        server = self.server
        now = self.read_at
        if now >= stream.deadline:
            self._expired(stream_id, adm.BEFORE_EVALUATION)
            return
        if stream.path not in server.queued:
            self.turn_cost += DISPATCH_COST
            self._evaluate(stream_id, stream)
            return
        admission, queue = server.admission, server.queue
        # the wait ahead: the queue's work at the recent cost per Check, or the oldest one's age
        wait = max(len(queue) * server.cost_per_call, now - queue[0][0]) if queue else 0.0
        if admission.pending >= admission.max_pending or wait > admission.max_queue_delay:
            reason = admission.refusal(wait) or adm.QUEUE_DELAY
            self._respond_error(stream_id, adm.REFUSED_STATUS, admission.refused(reason, self.peer, wait))
            return
        admission.pending += 1
        stream.admitted = True
        self.turn_cost += DISPATCH_COST
        queue.append((now, self, stream_id, stream))

    def _expired(self, stream_id: int, stage: str) -> None:
        self._respond_error(stream_id, adm.EXPIRED_STATUS, self.server.admission.expired(stage, self.peer))

    def _evaluate(self, stream_id: int, stream: _Stream) -> None:
        """Run the handler: answered now unless it waits, then answered when its task ends."""
        try:
            message = h2.parse_grpc_message(bytes(stream.body))
        except ValueError as exc:
            self._done(stream)
            self._respond_error(stream_id, h2.GRPC_INTERNAL, str(exc))
            return
        self._release(stream)  # handed to the handler: the peer may send more
        coroutine = stream.handler(message, stream.headers)  # type: ignore[misc]
        try:
            done, value = _drive(coroutine)
        except GrpcError as exc:
            self._done(stream)
            self._respond_error(stream_id, exc.code, str(exc))
            return
        except Exception:  # noqa: BLE001 - one bad request must not end the connection
            self._done(stream)
            log.exception("handler for %s failed", stream.path)
            self._respond_error(stream_id, h2.GRPC_INTERNAL, "internal error")
            return
        if done:
            self._done(stream)
            self._respond(stream_id, value)
            return
        stream.body = bytearray()
        self.in_flight += 1
        server = self.server
        task = stream.task = asyncio.ensure_future(_finish(coroutine, value, stream.deadline, server.clock))
        task.add_done_callback(lambda t: self._finished(stream_id, stream, t))
        if stream.deadline != NO_DEADLINE:
            stream.timer = self.loop.call_later(max(0.0, stream.deadline - server.clock()), self._expire, stream)

    def _done(self, stream: _Stream) -> None:
        """The call is answered (or abandoned): it no longer counts against the admission limit."""
        if stream.admitted:
            stream.admitted = False
            self.server.admission.pending -= 1

    @staticmethod
    def _expire(stream: _Stream) -> None:
        """A waiting call's deadline: stop it (answered DEADLINE_EXCEEDED when its task ends)."""
        if stream.task is not None and not stream.task.done():
            stream.expired = True
            stream.task.cancel()

    def _finished(self, stream_id: int, stream: _Stream, task: asyncio.Future[bytes]) -> None:
        self.in_flight -= 1
        stream.task = None
        self._done(stream)
        if stream.timer is not None:
            stream.timer.cancel()
        exc = None if task.cancelled() else task.exception()
        try:
            if stream.expired or isinstance(exc, _Expired):
                message = self.server.admission.expired(adm.WHILE_WAITING, self.peer)
                if self.streams.get(stream_id) is stream:  # else reset by the client: nothing to say
                    self._respond_error(stream_id, adm.EXPIRED_STATUS, message)
            elif task.cancelled():
                self._respond_error(stream_id, h2.GRPC_UNAVAILABLE, "server shutting down")
            elif isinstance(exc, GrpcError):
                self._respond_error(stream_id, exc.code, str(exc))
            elif exc is not None:
                log.error("handler failed", exc_info=exc)
                self._respond_error(stream_id, h2.GRPC_INTERNAL, "internal error")
            else:
                self._respond(stream_id, task.result())
        except h2.ConnectionError_ as exc:
            self._fail(exc)
            return
        self.after_output()
        self.server.changed.set()

    def after_output(self) -> None:
        """Answers were queued outside ``data_received``: write them (and close if drained)."""
        self._flush()
        if self.drain_stage == 2:
            self._close_if_drained()

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
        if queue:
            self.blocked[stream_id] = stream
            return
        if self.blocked:
            self.blocked.pop(stream_id, None)
        if stream.finished:
            self.streams.pop(stream_id, None)

    def _send_blocked(self) -> None:
        """The peer granted window: send what was waiting for it, oldest first."""
        for stream_id, stream in list(self.blocked.items()):
            self._pump(stream_id, stream)

    def _stream_messages(self, stream_id: int, stream: _Stream, end: bool) -> None:
        """Answer every complete request message of a streaming call, then end with the client."""
        handler = stream.streaming
        assert handler is not None
        body = stream.body
        consumed = 0
        while len(body) >= 5:
            length = int.from_bytes(body[1:5], "big")
            if body[0]:
                self._respond_error(stream_id, h2.GRPC_INTERNAL, "compressed gRPC messages are not supported")
                return
            if length > self.limits.max_message_bytes:
                self._respond_error(stream_id, h2.GRPC_RESOURCE_EXHAUSTED,
                                    f"request larger than {self.limits.max_message_bytes} bytes")
                return
            if len(body) < 5 + length:
                break
            message = bytes(body[5: 5 + length])
            del body[: 5 + length]
            consumed += 5 + length
            try:
                reply = handler(message)
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the connection
                self._respond_error(stream_id, h2.GRPC_INTERNAL, f"{type(exc).__name__}: {exc}")
                return
            if not stream.started:
                stream.started = True
                stream.outgoing.append((h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, h2.RESPONSE_HEADERS), 0))
            stream.outgoing.extend(self._data_frames(stream_id, reply))
        if consumed:
            self._release(stream, consumed)
            if not end:  # the stream goes on: give its window back too
                stream.recv_window += consumed
                self.out.append(h2.window_update(stream_id, consumed))
        if end:
            stream.closed_remote = True
            if not stream.started:
                stream.outgoing.append((h2.frame(h2.HEADERS, h2.END_HEADERS, stream_id, h2.RESPONSE_HEADERS), 0))
            self._finish_stream(stream_id, stream)
        else:
            self._pump(stream_id, stream)

    def _respond_error(self, stream_id: int, code: int, message: str, http_status: int = 200) -> None:
        """Answer an open stream with a status and no message, now; a peer still sending is told
        to stop with RST_STREAM(NO_ERROR) (RFC 9113 §8.1) and its further frames are dropped."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:  # already answered, or reset by the peer
            return
        self.blocked.pop(stream_id, None)
        self._release(stream)
        self.out.append(h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, stream_id,
                                 h2.trailers_only(code, message, http_status)))
        if not stream.closed_remote:
            self._control(h2.rst_stream(stream_id, h2.NO_ERROR))
            self.recent_resets.append(stream_id)

    def _reset(self, stream_id: int, code: int) -> None:
        """A stream error: RST_STREAM(code); the stream's late frames are dropped."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.blocked.pop(stream_id, None)
            self._release(stream)
        self._control(h2.rst_stream(stream_id, code))
        self.recent_resets.append(stream_id)

    def _control(self, data: bytes) -> None:
        """Queue a reply the peer provoked; too many it has not taken yet end the connection."""
        self.out.append(data)
        self.control_turn += 1
        if self.control_turn + self.control_buffered > self.limits.max_control_frames:
            if self.control_buffered and self.transport is not None and not self.transport.get_write_buffer_size():
                self.control_buffered = 0  # the earlier ones have gone out meanwhile
            if self.control_turn + self.control_buffered > self.limits.max_control_frames:
                raise LimitExceeded("control_frames", f"more than {self.limits.max_control_frames} control-frame "
                                    "replies (PING/SETTINGS ACK, RST_STREAM) not read by the peer")

    def _flush(self) -> None:
        transport = self.transport
        if self.out and transport is not None and not transport.is_closing():
            transport.write(b"".join(self.out))
            if self.control_turn or self.control_buffered:
                self.control_buffered = self.control_buffered + self.control_turn \
                    if transport.get_write_buffer_size() else 0
        self.control_turn = 0
        self.out.clear()

    def _fail(self, exc: h2.ConnectionError_) -> None:
        """A connection error: GOAWAY with its code, then close."""
        if isinstance(exc, LimitExceeded):
            self.server.report(exc.limit, self.peer, str(exc))
        else:
            self.server.report_protocol_error(self.peer, str(exc))
        self.out.append(h2.goaway(self.last_stream, exc.code, str(exc).encode()[:200]))
        self._flush()
        self._close()

    def _close(self) -> None:
        """Close once the queued frames (a GOAWAY last) are out. The peer's side stays open to be
        read and dropped until it closes too: closing with its frames unread would make the kernel
        send a reset that destroys the GOAWAY before the peer reads it. A peer that reads nothing
        or never closes is cut off after CLOSE_LINGER."""
        self.closed = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            if not self.reading:
                self.reading = True
                transport.resume_reading()
        else:
            transport.close()
        self.loop.call_later(CLOSE_LINGER, transport.abort)

    # --- connection lifetime --------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Graceful close, phase one: no new streams please (GOAWAY 2^31-1), and a PING whose ACK
        proves every stream the peer opened before reading that GOAWAY has arrived."""
        if self.drain_stage or self.closed:
            return
        self.drain_stage = 1
        self.out.append(h2.goaway(h2.MAX_STREAM_ID, h2.NO_ERROR))
        self.out.append(h2.ping(DRAIN_PING))
        self._flush()
        self.drain_timer = self.loop.call_later(DRAIN_PING_TIMEOUT, self._final_goaway)

    def _final_goaway(self) -> None:
        """Phase two: the real last stream id; streams above it are refused, the rest answered."""
        if self.drain_stage != 1 or self.closed:
            return
        self.drain_stage = 2
        if self.drain_timer is not None:
            self.drain_timer.cancel()
        self.goaway_last = self.last_stream
        self.out.append(h2.goaway(self.last_stream, h2.NO_ERROR))
        self._flush()
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if not self.busy and not self.closed:
            self._close()

    def check_idle(self, elapsed: float) -> None:
        """Called every ``elapsed`` seconds: close after ``idle_timeout`` without request frames."""
        if self.closed or self.in_flight or self.activity != self.activity_seen:
            self.activity_seen = self.activity
            self.idle_for = 0.0
            return
        self.idle_for += elapsed
        if self.idle_for >= self.limits.idle_timeout:
            self.out.append(h2.goaway(self.last_stream, h2.NO_ERROR, b"idle"))
            self._flush()
            self._close()

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
    ``on_limit(name)`` is called each time a limit closes a connection (for a metric).
    The ``queued`` methods go through the run queue under ``admission``; the others (health,
    diagnostics) are answered within the read that completes them. ``clock`` is the server's
    time (deadlines, queue slices), replaceable in tests.
    """

    def __init__(self, methods: dict[str, UnaryHandler], ssl_context: ssl.SSLContext | None = None,
                 streaming: dict[str, MessageHandler] | None = None, limits: Http2Limits | None = None,
                 on_limit: Callable[[str], None] | None = None, *, queued: frozenset[str] = frozenset(),
                 admission: adm.Admission | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.methods = methods
        self.queued = queued
        self.admission = admission or adm.Admission()
        self.clock = clock
        #: calls taken on and not yet evaluated, oldest first: (taken at, connection, stream id, stream)
        self.queue: deque[tuple[float, _Connection, int, _Stream]] = deque()
        self.queue_scheduled = False
        #: seconds one queued call took to evaluate, a moving average (the admission's wait estimate)
        self.cost_per_call = 0.0
        self.streaming = streaming or {}
        self.ssl_context = ssl_context
        self.limits = limits or Http2Limits()
        self.connections: set[_Connection] = set()
        #: request bytes buffered by every connection together (Http2Limits.process_buffer_bytes)
        self.buffered = 0
        self.draining = False
        self.changed = asyncio.Event()
        self.report = LimitReporter(on_limit or (lambda name: None))
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def run_queue(self) -> None:
        """Evaluate queued calls, oldest first, for one slice; the rest after the next reads.

        A call whose stream is gone (reset, connection closed) is dropped; one past its deadline
        is answered DEADLINE_EXCEEDED without being evaluated. Answers are written per connection
        at the end of the slice, as within a read.
        """
        self.queue_scheduled = False
        queue, clock, admission = self.queue, self.clock, self.admission
        touched: set[_Connection] = set()
        start = now = clock()
        evaluated = False
        cost = self.cost_per_call
        while queue:
            if evaluated:  # the previous call's evaluation took since the last reading
                evaluated, before = False, now
                now = clock()
                cost += (now - before - cost) * COST_WEIGHT
                if now - start >= QUEUE_SLICE:
                    break
            _, connection, stream_id, stream = queue.popleft()
            if connection.closed or connection.streams.get(stream_id) is not stream:
                connection._done(stream)
                if not connection.closed:  # reset: the client gave up (Envoy does at its timeout)
                    admission.expired(adm.BEFORE_EVALUATION, connection.peer)
                continue
            touched.add(connection)
            try:
                if now >= stream.deadline:
                    connection._done(stream)
                    connection._expired(stream_id, adm.BEFORE_EVALUATION)
                else:
                    evaluated = True
                    connection._evaluate(stream_id, stream)
            except h2.ConnectionError_ as exc:
                connection._fail(exc)
        if evaluated:
            cost += (clock() - now - cost) * COST_WEIGHT
        self.cost_per_call = cost
        for connection in touched:
            connection.after_output()
        if queue:
            self.queue_scheduled = True
            asyncio.get_running_loop().call_soon(self.run_queue)
        if self.draining:
            self.changed.set()

    def report_protocol_error(self, peer: str, detail: str) -> None:
        self.report.note("protocol_error", f"HTTP/2 protocol error from {peer}: {detail}")

    async def start(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Connection(self), host, int(port), reuse_port=True, ssl=self.ssl_context, backlog=1024,
        )
        if self.limits.idle_timeout > 0:
            self._sweeper = asyncio.create_task(self._sweep(max(0.05, self.limits.idle_timeout / 4)))
        return self._server.sockets[0].getsockname()[1]

    async def _sweep(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for connection in list(self.connections):
                connection.check_idle(interval)

    async def stop(self, grace: float) -> None:
        """Stop accepting, drain every connection (two-phase GOAWAY), let in-flight calls finish
        within ``grace``, then close what is left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.begin_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.connections and loop.time() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()


def unary(parse: Callable[[bytes], Any], call: Callable[[Any], Awaitable[Any]]) -> UnaryHandler:
    """Adapt ``call(message) -> message`` to a bytes handler (Diagnostics, health)."""
    async def handler(data: bytes, headers: Headers) -> bytes:
        try:
            request = parse(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError subclasses
            raise GrpcError(h2.GRPC_INVALID_ARGUMENT, f"cannot parse request: {exc}") from None
        response = await call(request)
        return response.SerializeToString()
    return handler
