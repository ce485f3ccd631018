"""HTTP/2 framing (RFC 9113) for the fast gRPC server: constants, frame encoding, gRPC messages.

Only what a unary gRPC server needs. Response header blocks are constant and encoded once, with
static-table indexes and never-indexed literals, so they never touch the peer's HPACK dynamic
table and need no encoder state.
"""

from __future__ import annotations

import struct
from urllib.parse import quote

from hpack import Encoder, NeverIndexedHeaderTuple

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">HBBBL")  # length (24 bits as 16+8), type, flags, stream id

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8  # RFC 8441
SETTINGS_NO_RFC7540_PRIORITIES = 0x9  # RFC 9218

NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE_LIMIT = 2**24 - 1
MAX_STREAM_ID = 2**31 - 1

# gRPC status codes used here
GRPC_OK = 0
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_NOT_FOUND = 5
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14


class ConnectionError_(Exception):  # noqa: N801 - not the builtin: an HTTP/2 connection error
    """A connection-level protocol error: answer GOAWAY with ``code`` and close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HL", k, v) for k, v in settings.items()))


class StreamError(Exception):
    """A stream-level protocol error: answer RST_STREAM with ``code``, the connection lives on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    """The (identifier, value) pairs of a SETTINGS frame, checked as RFC 9113 §6.5.2 requires."""
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    settings = [struct.unpack_from(">HL", payload, i) for i in range(0, len(payload), 6)]
    for key, value in settings:
        if key == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ConnectionError_(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value} above 2^31-1")
        if key == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_SIZE_LIMIT:
            raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value} outside 2^14..2^24-1")
        if key in (SETTINGS_ENABLE_PUSH, SETTINGS_ENABLE_CONNECT_PROTOCOL, SETTINGS_NO_RFC7540_PRIORITIES) \
                and value > 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"SETTINGS 0x{key:x} = {value}: only 0 or 1 allowed")
    return settings


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">L", increment))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">LL", last_stream_id, code) + debug)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">L", code))


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def _block(headers: list[tuple[str, str]]) -> bytes:
    """A header block that uses only the static table and never-indexed literals."""
    return Encoder().encode(
        [h if h[0] == ":status" else NeverIndexedHeaderTuple(*h) for h in headers], huffman=False
    )


RESPONSE_HEADERS = _block([(":status", "200"), ("content-type", "application/grpc")])
TRAILERS_OK = _block([("grpc-status", "0")])


def trailers_only(code: int, message: str, http_status: int = 200) -> bytes:
    """Header block of a gRPC "trailers-only" response (an error with no message).

    ``http_status`` other than 200 answers a request that is not a valid gRPC call (405, 415, ...).
    """
    return _block([(":status", str(http_status)), ("content-type", "application/grpc"), ("grpc-status", str(code)),
                   ("grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"))])


def grpc_message(payload: bytes) -> bytes:
    """Length-prefixed gRPC message (uncompressed)."""
    return struct.pack(">BL", 0, len(payload)) + payload


def parse_grpc_message(body: bytes) -> bytes:
    """The single message of a unary request; ValueError when framing is wrong or compressed."""
    if len(body) < 5:
        raise ValueError("gRPC message shorter than its 5-byte prefix")
    compressed, length = struct.unpack_from(">BL", body)
    if compressed:
        raise ValueError("compressed gRPC messages are not supported (no grpc-encoding is negotiated)")
    if len(body) != 5 + length:
        raise ValueError(f"gRPC message length {length} does not match the {len(body) - 5} bytes received")
    return body[5:]
