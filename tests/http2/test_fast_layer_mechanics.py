"""The fast layer's fairness, memory and drain mechanics, driven turn by turn in-process.

A scripted transport stands in for the socket, so each property is exact and independent of
the machine's speed: how much one ``data_received`` may do, when reading pauses and resumes,
when credit comes back, what the drain sends in which order.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Awaitable, Callable

import pytest
from hpack import Encoder

from authz_server.grpc_api import fast_server
from authz_server.grpc_api.fast_server import FastGrpcServer, _Connection
from authz_server.grpc_api.h2_limits import Http2Limits
from loadtests import h2_attacks as a

ECHO = "/test.Echo/Echo"


async def echo(data: bytes, headers: list[tuple[str, str]]) -> bytes:
    return data


class ScriptedTransport(asyncio.Transport):
    """Records writes; its write buffer holds ``held`` bytes (0 = the peer reads everything)."""

    def __init__(self, protocol: _Connection, high_water: int | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.reader = a.FrameReader()
        self.held = 0
        self.high_water = high_water
        self.reading = True
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.reader.feed(bytes(data))
        if self.high_water is not None:
            self.held += len(data)
            if self.held > self.high_water:
                self.protocol.pause_writing()

    def drain(self) -> None:
        """The peer read everything: the buffer empties (below the low-water mark)."""
        self.held = 0
        self.protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self.held

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    @property
    def received(self) -> a.Received:
        return self.reader.received


def connect(server: FastGrpcServer, high_water: int | None = None) -> tuple[_Connection, ScriptedTransport]:
    connection = _Connection(server)
    transport = ScriptedTransport(connection, high_water)
    connection.connection_made(transport)
    connection.data_received(a.PREFACE + a.settings() + a.frame(a.SETTINGS, a.ACK, 0))
    return connection, transport


def run(scenario: Callable[[FastGrpcServer], Awaitable[None]], **limits: Any) -> list[str]:
    """Run ``scenario`` against a server (not listening); returns the limits it reported."""
    reported: list[str] = []

    async def main() -> None:
        server = FastGrpcServer({ECHO: echo}, limits=Http2Limits(**limits), on_limit=reported.append)
        await scenario(server)
    asyncio.run(main())
    return reported


async def turns(count: int = 1) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def block(headers: list[tuple[str, str]]) -> bytes:
    """A stateless header block (it opens with a table size update to 0, as the server asks)."""
    encoder = Encoder()
    encoder.header_table_size = 0
    return encoder.encode(headers)


def call(stream_id: int, message: bytes, end: bool = True, path: str = ECHO) -> bytes:
    headers = a.frame(a.HEADERS, a.END_HEADERS, stream_id, block(a.request_headers(path)))
    return headers + a.frame(a.DATA, a.END_STREAM if end else 0, stream_id, message)


def test_one_turn_handles_a_bounded_share_and_the_rest_follows_on_later_turns() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        flood, transport = connect(server)
        before = flood.send_window
        flood.data_received(a.frame(a.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 2000)
        assert flood.send_window - before == fast_server.FRAMES_PER_TURN  # one turn's share only
        assert not transport.reading  # and no more input taken until the backlog is done
        other, other_transport = connect(server)  # meanwhile another connection is served
        other.data_received(call(1, a.grpc_message(b"hi")))
        assert other_transport.received.grpc_status(1) == "0"
        await turns(2000 // fast_server.FRAMES_PER_TURN + 1)
        assert flood.send_window - before == 2000 and transport.reading  # nothing lost
    run(scenario)


def test_dispatched_requests_and_decoded_header_bytes_count_against_the_turn() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server)
        connection.data_received(b"".join(call(2 * n + 1, a.grpc_message(b"x")) for n in range(200)))
        answered = len([s for s in transport.received.headers if transport.received.grpc_status(s)])
        assert answered <= fast_server.FRAMES_PER_TURN // (2 + fast_server.DISPATCH_COST) + 1
        await turns(50)
        assert all(transport.received.grpc_status(2 * n + 1) == "0" for n in range(200))
    run(scenario)


def test_a_peer_that_does_not_read_stops_being_read_until_it_does() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server, high_water=2_000)
        connection.data_received(b"".join(call(2 * n + 1, a.grpc_message(b"y" * 100)) for n in range(60)))
        await turns(20)
        assert not transport.reading and connection.backlog  # answers piled up: input waits
        answered = len(transport.received.data)
        await turns(20)
        assert len(transport.received.data) == answered  # nothing more done while it does not read
        transport.high_water = None
        transport.drain()
        await turns(20)
        assert len(transport.received.data) == 60 and transport.reading
    run(scenario)


def test_control_replies_a_peer_does_not_take_are_capped() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server, high_water=1 << 30)  # never pauses, never drains
        for _ in range(12):
            connection.data_received(a.settings(initial_window_size=65535) * 100)
            await turns(2)
        assert transport.received.goaway_code == a.ENHANCE_YOUR_CALM and transport.closing
    assert run(scenario, max_control_frames=1000) == ["control_frames"]


def test_control_replies_a_peer_reads_are_not_capped() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server)
        for _ in range(30):
            connection.data_received(a.settings(initial_window_size=65535) * 100)
            await turns(2)
        assert not transport.received.goaway
    assert run(scenario, max_control_frames=1000) == []


def test_connection_credit_comes_back_only_for_bytes_handed_to_the_handler() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server)
        body = a.grpc_message(b"z" * (200 << 10))
        chunks = [body[i: i + 16_000] for i in range(0, len(body), 16_000)]
        for stream_id in (1, 3, 5):
            connection.data_received(a.frame(a.HEADERS, a.END_HEADERS, stream_id, block(a.request_headers(ECHO)))
                                     + b"".join(a.frame(a.DATA, 0, stream_id, c) for c in chunks))
        assert server.buffered == 3 * len(body)
        assert [w for w in transport.received.window_updates if w[0] == 0] == [(0, (1 << 20) - 65535)]  # initial only
        for stream_id in (1, 3, 5):
            connection.data_received(a.frame(a.DATA, a.END_STREAM, stream_id))
        assert server.buffered == 0
        returned = sum(w[1] for w in transport.received.window_updates if w[0] == 0) - ((1 << 20) - 65535)
        assert returned == 3 * len(body)  # handed on: the credit is back
    run(scenario)


def test_all_connections_together_buffer_no_more_than_the_process_cap() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        body = a.frame(a.DATA, 0, 1, struct.pack(">BI", 0, 200 << 10) + b"\0" * 16_000)
        first = [connect(server) for _ in range(30)]
        for connection, _ in first:
            connection.data_received(a.frame(a.HEADERS, a.END_HEADERS, 1, block(a.request_headers(ECHO)))
                                     + body + a.frame(a.DATA, 0, 1, b"\0" * 16_000) * 10)
        assert server.buffered <= 1 << 20
        refused = [t for _, t in first if t.received.grpc_status(1) == "8"]
        assert refused and all(t.received.resets.get(1) == a.NO_ERROR for t in refused)
    run(scenario, process_buffer_bytes=1 << 20)


def test_the_header_cache_is_bounded_in_bytes() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, _ = connect(server)
        for n in range(400):
            stream_id = 2 * n + 1
            connection.data_received(a.frame(
                a.HEADERS, a.END_HEADERS | a.END_STREAM, stream_id,
                block(a.request_headers(ECHO, ("x-n", f"{n:04d}" + "v" * 3000)))))
            assert connection.header_cache_bytes <= fast_server.HEADER_CACHE_BYTES
        assert connection.header_cache  # small distinct blocks are cached, within the bound
    run(scenario)


def test_drain_is_two_phase_and_refuses_only_streams_after_the_final_goaway() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server)
        connection.begin_drain()
        received = transport.received
        assert received.goaway == [(2**31 - 1, a.NO_ERROR)] and received.pings[-1] == (0, fast_server.DRAIN_PING)
        connection.data_received(call(1, a.grpc_message(b"in flight")))  # sent before the peer saw GOAWAY
        assert received.grpc_status(1) == "0"
        connection.data_received(call(3, a.grpc_message(b"slow"), end=False))  # open while draining
        connection.data_received(a.frame(a.PING, a.ACK, 0, fast_server.DRAIN_PING))
        assert received.goaway[-1] == (3, a.NO_ERROR) and not transport.closing  # stream 3 still open
        connection.data_received(call(5, a.grpc_message(b"too late")))
        assert received.resets[5] == a.REFUSED_STREAM
        connection.data_received(a.frame(a.DATA, a.END_STREAM, 3))
        assert received.grpc_status(3) == "0" and transport.closing  # last answer out: closed
    run(scenario)


def test_drain_sends_the_final_goaway_without_a_ping_ack_too() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        connection, transport = connect(server)
        connection.begin_drain()
        await asyncio.sleep(fast_server.DRAIN_PING_TIMEOUT + 0.5)
        assert transport.received.goaway[-1] == (0, a.NO_ERROR) and transport.closing
    run(scenario)


def test_an_idle_connection_is_closed_and_a_busy_one_kept() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        idle, idle_transport = connect(server)
        busy, busy_transport = connect(server)
        for n in range(10):
            busy.data_received(call(2 * n + 1, a.grpc_message(b"x")))
            for connection in (idle, busy):
                connection.check_idle(0.5)
        assert idle_transport.closing and idle_transport.received.goaway[-1][1] == a.NO_ERROR
        assert not busy_transport.closing
    run(scenario, idle_timeout=2.0)


def test_pings_without_requests_are_strikes_as_in_grpc() -> None:
    async def scenario(server: FastGrpcServer) -> None:
        pinger, pinger_transport = connect(server)
        for _ in range(3):
            pinger.data_received(a.frame(a.PING, 0, 0, b"keepaliv"))
        assert not pinger_transport.received.goaway  # two strikes are allowed
        pinger.data_received(a.frame(a.PING, 0, 0, b"keepaliv"))
        assert pinger_transport.received.goaway_code == a.ENHANCE_YOUR_CALM
        working, working_transport = connect(server)
        for n in range(20):  # a request between PINGs: never a strike
            working.data_received(call(2 * n + 1, a.grpc_message(b"x")) + a.frame(a.PING, 0, 0, b"keepaliv"))
        assert not working_transport.received.goaway
    assert run(scenario) == ["pings"]


@pytest.mark.parametrize("limits", [{"max_connections": 2}])
def test_connections_over_the_cap_are_refused_with_goaway(limits: dict[str, int]) -> None:
    async def scenario(server: FastGrpcServer) -> None:
        kept = [connect(server) for _ in range(2)]
        _, refused = connect(server)
        assert refused.received.goaway_code == a.ENHANCE_YOUR_CALM and refused.closing
        assert not any(t.closing for _, t in kept) and len(server.connections) == 2
    assert run(scenario, **limits) == ["connections"]
