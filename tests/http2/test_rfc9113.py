"""RFC 9113 on the fast serving layer, frame by frame: the error code each mistake gets.

(The grpcio layer's framing is grpc C-core's, not ours: the abuse suite drives both layers.)

Connection errors end with GOAWAY and the code the RFC names; stream errors with RST_STREAM and
the connection lives on (the next request on it is answered). Frames are built by hand
(:mod:`loadtests.h2_attacks`): most of these the ``h2`` package would refuse to send.
"""

from __future__ import annotations

import struct
from typing import Callable

import pytest

from loadtests import h2_attacks as a
from tests.http2.conftest import CHECK, Served, StartServer

Build = Callable[[a.Peer], bytes]
MAX_WINDOW = 2**31 - 1


def request(peer: a.Peer, stream_id: int, end_stream: bool = True) -> bytes:
    return a.check_request(peer, stream_id, CHECK, end=end_stream)


def window_update(stream_id: int, increment: int) -> bytes:
    return a.frame(a.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def setting(key: int, value: int) -> bytes:
    return a.frame(a.SETTINGS, 0, 0, struct.pack(">HI", key, value))


CONNECTION_ERRORS: dict[str, tuple[Build, int]] = {
    "SETTINGS_MAX_FRAME_SIZE 0": (lambda p: setting(5, 0), a.PROTOCOL_ERROR),
    "SETTINGS_MAX_FRAME_SIZE 2^24": (lambda p: setting(5, 1 << 24), a.PROTOCOL_ERROR),
    "SETTINGS_ENABLE_PUSH 2": (lambda p: setting(2, 2), a.PROTOCOL_ERROR),
    "SETTINGS_INITIAL_WINDOW_SIZE 2^31": (lambda p: setting(4, 1 << 31), a.FLOW_CONTROL_ERROR),
    "SETTINGS length not a multiple of 6": (lambda p: a.frame(a.SETTINGS, 0, 0, b"\0" * 5), a.FRAME_SIZE_ERROR),
    "SETTINGS on a stream": (lambda p: a.frame(a.SETTINGS, 0, 1), a.PROTOCOL_ERROR),
    "SETTINGS ACK with a payload": (lambda p: a.frame(a.SETTINGS, a.ACK, 0, b"\0" * 6), a.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE of 0 on the connection": (lambda p: window_update(0, 0), a.PROTOCOL_ERROR),
    "connection window above 2^31-1": (lambda p: window_update(0, MAX_WINDOW), a.FLOW_CONTROL_ERROR),
    "WINDOW_UPDATE of 3 bytes": (lambda p: a.frame(a.WINDOW_UPDATE, 0, 0, b"\0\0\1"), a.FRAME_SIZE_ERROR),
    "WINDOW_UPDATE on an idle stream": (lambda p: window_update(9, 1), a.PROTOCOL_ERROR),
    "DATA on stream 0": (lambda p: a.frame(a.DATA, 0, 0, b"x"), a.PROTOCOL_ERROR),
    "DATA on an idle stream": (lambda p: a.frame(a.DATA, 0, 5, b"x"), a.PROTOCOL_ERROR),
    "HEADERS on stream 0": (lambda p: a.frame(a.HEADERS, a.END_HEADERS, 0, p.block(a.request_headers())),
                            a.PROTOCOL_ERROR),
    "HEADERS on an even stream": (lambda p: a.frame(a.HEADERS, a.END_HEADERS, 2, p.block(a.request_headers())),
                                  a.PROTOCOL_ERROR),
    "a stream id going down": (lambda p: request(p, 5) + request(p, 3), a.PROTOCOL_ERROR),
    "CONTINUATION without HEADERS": (lambda p: a.frame(a.CONTINUATION, a.END_HEADERS, 1), a.PROTOCOL_ERROR),
    "another frame inside a header block": (
        lambda p: a.frame(a.HEADERS, 0, 1, p.block(a.request_headers())) + a.frame(a.PING, 0, 0, b"8 bytes!"),
        a.PROTOCOL_ERROR),
    "PING of 7 bytes": (lambda p: a.frame(a.PING, 0, 0, b"7 bytes"), a.FRAME_SIZE_ERROR),
    "PING on a stream": (lambda p: a.frame(a.PING, 0, 1, b"8 bytes!"), a.PROTOCOL_ERROR),
    "RST_STREAM on stream 0": (lambda p: a.frame(a.RST_STREAM, 0, 0, b"\0\0\0\0"), a.PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (lambda p: a.frame(a.RST_STREAM, 0, 7, b"\0\0\0\0"), a.PROTOCOL_ERROR),
    "RST_STREAM of 3 bytes": (lambda p: request(p, 1, False) + a.frame(a.RST_STREAM, 0, 1, b"\0\0\0"),
                              a.FRAME_SIZE_ERROR),
    "PRIORITY on stream 0": (lambda p: a.frame(a.PRIORITY, 0, 0, b"\0" * 5), a.PROTOCOL_ERROR),
    "PRIORITY of 4 bytes": (lambda p: a.frame(a.PRIORITY, 0, 1, b"\0" * 4), a.FRAME_SIZE_ERROR),
    "GOAWAY on a stream": (lambda p: a.frame(a.GOAWAY, 0, 1, b"\0" * 8), a.PROTOCOL_ERROR),
    "PUSH_PROMISE from a client": (lambda p: a.frame(a.PUSH_PROMISE, a.END_HEADERS, 1, b"\0\0\0\2"),
                                   a.PROTOCOL_ERROR),
    "a frame over SETTINGS_MAX_FRAME_SIZE": (lambda p: a.frame(a.DATA, 0, 1, b"x" * 16_385), a.FRAME_SIZE_ERROR),
    "padding longer than the frame": (lambda p: request(p, 1, False) + a.frame(a.DATA, a.PADDED, 1, b"\x09abc"),
                                      a.PROTOCOL_ERROR),
    "an undecodable header block": (lambda p: a.frame(a.HEADERS, a.END_HEADERS, 1, b"\xff\xff\xff\xff"),
                                    a.COMPRESSION_ERROR),
    # 5 streams x 250 KiB never ended: credit comes back only when a message is handed on, so
    # they exceed the 1 MiB connection window and the peer is in breach of flow control.
    "DATA beyond the connection window": (
        lambda p: b"".join(request(p, s, False) + a.frame(a.DATA, 0, s, struct.pack(">BI", 0, 250 << 10))
                           + b"".join(a.frame(a.DATA, 0, s, b"\0" * 16_000) for _ in range(16))
                           for s in (1, 3, 5, 7, 9)),
        a.FLOW_CONTROL_ERROR),
}


@pytest.mark.parametrize("case", CONNECTION_ERRORS, ids=list(CONNECTION_ERRORS))
def test_connection_errors_get_goaway_with_the_rfc_code(fast: Served, case: str) -> None:
    build, code = CONNECTION_ERRORS[case]
    peer = a.Peer(fast.port)
    try:
        peer.send_all(build(peer))
        received = peer.read_until_closed()
    finally:
        peer.close()
    assert received.goaway_code == code, (case, received.goaway, received.resets)
    assert_still_serving(fast)


def test_the_client_preface_must_end_with_settings(fast: Served) -> None:
    peer = a.Peer(fast.port, preface=a.PREFACE + a.frame(a.PING, 0, 0, b"8 bytes!"))
    try:
        assert peer.read_until_closed().goaway_code == a.PROTOCOL_ERROR
    finally:
        peer.close()


ZERO_WINDOW = a.PREFACE + a.settings(initial_window_size=0)  # answers stay queued: streams stay open
MALFORMED = {
    "an upper-case field name": [("X-Upper", "1")],
    "a connection-specific field": [("connection", "keep-alive")],
    "te other than trailers": [("te", "gzip")],
    "a pseudo-header after a regular field": [("x-a", "1"), (":method", "POST")],
    "an unknown pseudo-header": [(":protocol", "websocket")],
    "a CR in a value": [("x-a", "a\rb")],
}
STREAM_ERRORS: dict[str, tuple[bytes | None, Build, int]] = {
    "WINDOW_UPDATE of 0 on a stream": (None, lambda p: request(p, 1, False) + window_update(1, 0),
                                       a.PROTOCOL_ERROR),
    "a stream window above 2^31-1": (None, lambda p: request(p, 1, False) + window_update(1, MAX_WINDOW),
                                     a.FLOW_CONTROL_ERROR),
    "DATA on a half-closed (remote) stream": (ZERO_WINDOW, lambda p: request(p, 1) + a.frame(a.DATA, 0, 1, b"x"),
                                              a.STREAM_CLOSED),
    "HEADERS on a half-closed (remote) stream": (
        ZERO_WINDOW, lambda p: request(p, 1) + a.frame(a.HEADERS, a.END_HEADERS | a.END_STREAM, 1,
                                                       p.block([("x-trailer", "1")])), a.STREAM_CLOSED),
    "DATA on a closed stream": (None, lambda p: request(p, 1) + a.frame(a.PING, 0, 0, b"barrier!"), a.STREAM_CLOSED),
    "trailers without END_STREAM": (None, lambda p: request(p, 1, False) + a.frame(
        a.HEADERS, a.END_HEADERS, 1, p.block([("x-trailer", "1")])), a.PROTOCOL_ERROR),
    "a pseudo-header in trailers": (None, lambda p: request(p, 1, False) + a.frame(
        a.HEADERS, a.END_HEADERS | a.END_STREAM, 1, p.block([(":path", "/x")])), a.PROTOCOL_ERROR),
    "a stream depending on itself (PRIORITY)": (None, lambda p: request(p, 1, False) + a.frame(
        a.PRIORITY, 0, 1, struct.pack(">IB", 1, 16)), a.PROTOCOL_ERROR),
    "a stream depending on itself (HEADERS)": (None, lambda p: a.frame(
        a.HEADERS, a.END_HEADERS | a.PRIORITY_FLAG, 1, struct.pack(">IB", 1, 16) + p.block(a.request_headers())),
        a.PROTOCOL_ERROR),
    # 1-byte bodies with 255 bytes of padding: the window runs out long before the message is big
    "DATA beyond the stream window (padding counts)": (None, lambda p: request(p, 1, False) + b"".join(
        a.frame(a.DATA, a.PADDED, 1, bytes([255]) + b"\0" * 256) for _ in range(1100)), a.FLOW_CONTROL_ERROR),
    **{f"a malformed request: {name}": (None, lambda p, extra=extra: a.frame(  # type: ignore[misc]
        a.HEADERS, a.END_HEADERS, 1, p.block([*a.request_headers()[:4], *extra, *a.request_headers()[4:]])),
        a.PROTOCOL_ERROR) for name, extra in MALFORMED.items()},
    "a request without :path": (None, lambda p: a.frame(a.HEADERS, a.END_HEADERS, 1, p.block(
        [h for h in a.request_headers() if h[0] != ":path"])), a.PROTOCOL_ERROR),
}


@pytest.mark.parametrize("case", STREAM_ERRORS, ids=list(STREAM_ERRORS))
def test_stream_errors_get_rst_stream_and_the_connection_lives_on(fast: Served, case: str) -> None:
    preface, build, code = STREAM_ERRORS[case]
    peer = a.Peer(fast.port, preface=preface)
    try:
        data = build(peer)
        if case == "DATA on a closed stream":  # once the answer is in, the stream is closed
            peer.send_all(data)
            peer.read_until(lambda r: r.grpc_status(1) is not None)
            data = a.frame(a.DATA, 0, 1, b"late")
        peer.send_all(data)
        received = peer.read_until(lambda r: 1 in r.resets)
        assert received.resets.get(1) == code, (case, received.resets, received.goaway)
        assert not received.goaway
        if preface is ZERO_WINDOW:
            peer.send_all(window_update(0, 1 << 20) + a.settings(initial_window_size=65535))
        assert a.answered(peer, 11, CHECK)
    finally:
        peer.close()


def test_settings_are_acknowledged_and_advertise_the_limits(fast: Served) -> None:
    peer = a.Peer(fast.port)
    try:
        received = peer.read_until(lambda r: bool(r.settings))
    finally:
        peer.close()
    advertised = received.settings[0]
    assert advertised[0x1] == 0  # HEADER_TABLE_SIZE: stateless header blocks
    assert advertised[0x2] == 0  # no push
    assert advertised[0x3] == 256  # MAX_CONCURRENT_STREAMS
    assert advertised[0x6] == 16_384  # MAX_HEADER_LIST_SIZE, as grpcio
    assert advertised[0x4] >= (256 << 10) + 5  # one whole message fits a stream's window


def test_streams_over_the_concurrency_limit_are_refused(start_server: StartServer) -> None:
    served = start_server("fast", "--max-concurrent-streams", "2")
    peer = a.Peer(served.port)
    try:
        peer.send_all(request(peer, 1, False) + request(peer, 3, False) + request(peer, 5, False))
        assert peer.read_until(lambda r: 5 in r.resets).resets == {5: a.REFUSED_STREAM}
        peer.send_all(a.frame(a.DATA, a.END_STREAM, 1, a.grpc_message(CHECK)))
        assert peer.read_until(lambda r: r.grpc_status(1) is not None).grpc_status(1) == "0"
    finally:
        peer.close()


def assert_still_serving(served: Served) -> None:
    peer = a.Peer(served.port)
    try:
        assert a.answered(peer, 1, CHECK)
    finally:
        peer.close()
