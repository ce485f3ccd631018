"""What a gRPC request's header block must hold: RFC 9113 §8.2-8.3 and gRPC over HTTP/2.

A malformed request (bad pseudo-headers, upper-case or connection-specific fields, ``te`` other
than ``trailers``) is a stream error PROTOCOL_ERROR (:class:`MalformedRequest`). A well-formed
HTTP request that is not a gRPC call gets an HTTP answer instead (:class:`Refusal`): 405 for a
method other than POST, 415 for a content type that is not ``application/grpc*`` (as the gRPC
spec says), 400 without ``te: trailers`` (gRPC needs trailers), 431 for a header list over the
limit, 400 with status INTERNAL for a malformed ``grpc-timeout`` (as grpc-go answers it). Checked
once per distinct header block: the result, with the call's timeout, is cached with the block.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz_server.grpc_api import h2_frames as h2

Headers = list[tuple[str, str]]

#: RFC 9113 §8.2.2: connection-specific fields are malformed in HTTP/2
CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
REQUEST_PSEUDO = frozenset({":method", ":scheme", ":path", ":authority"})
_FORBIDDEN_IN_VALUES = ("\x00", "\r", "\n")
#: gRPC over HTTP/2: ``grpc-timeout`` is at most 8 ASCII digits and one of these units (seconds each)
TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
TIMEOUT_MAX_DIGITS = 8


class MalformedRequest(Exception):
    """RFC 9113 §8.1.1: a malformed request is a stream error of type PROTOCOL_ERROR."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP answer instead of the call: status, and the gRPC status carried with it."""

    http_status: int
    grpc_code: int
    message: str


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A checked request header block: the method path, every field, or why it is refused."""

    path: str
    headers: Headers
    refusal: Refusal | None = None
    #: why the block is a malformed request (a stream error PROTOCOL_ERROR), else None
    malformed: str | None = None
    #: the call's ``grpc-timeout`` in seconds (None: the client set no deadline)
    timeout: float | None = None


def header_list_size(headers: Headers) -> int:
    """RFC 9113 §6.5.2 size of a header list: name + value + 32 octets per field."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


def parse_grpc_timeout(value: str) -> float:
    """``grpc-timeout`` (TimeoutValue TimeoutUnit) in seconds; ValueError when malformed.

    The gRPC spec allows 1 to 8 ASCII digits then one unit letter; ``0`` is accepted (as grpc-go
    does) and means the deadline has already passed.
    """
    digits, unit = value[:-1], value[-1:]
    scale = TIMEOUT_UNITS.get(unit)
    if scale is None or not 1 <= len(digits) <= TIMEOUT_MAX_DIGITS or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"malformed grpc-timeout {value[:32]!r}: expected 1-{TIMEOUT_MAX_DIGITS} digits "
                         "and a unit (H, M, S, m, u, n)")
    return int(digits) * scale


def request_head(headers: Headers, max_header_list_bytes: int) -> RequestHead:
    """Check a request's header block: the call, an HTTP refusal, or why it is malformed."""
    try:
        return _request_head(headers, max_header_list_bytes)
    except MalformedRequest as exc:
        return RequestHead("", headers, malformed=str(exc))


def _request_head(headers: Headers, max_header_list_bytes: int) -> RequestHead:
    pseudo: dict[str, str] = {}
    regular = False
    content_type = te = timeout = None
    for name, value in headers:
        if any(c in value for c in _FORBIDDEN_IN_VALUES) or not name:
            raise MalformedRequest(f"invalid characters in field {name!r}")
        if name[0] == ":":
            if regular:
                raise MalformedRequest(f"pseudo-header {name} after a regular field")
            if name not in REQUEST_PSEUDO:
                raise MalformedRequest(f"pseudo-header {name} is not a request pseudo-header")
            if name in pseudo:
                raise MalformedRequest(f"pseudo-header {name} repeated")
            pseudo[name] = value
            continue
        regular = True
        if name != name.lower() or any(c in name for c in " :"):
            raise MalformedRequest(f"field name {name!r} is not lower-case token characters")
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name} in an HTTP/2 request")
        if name == "te":
            if value != "trailers":
                raise MalformedRequest(f"te: {value!r} (only 'trailers' is allowed in HTTP/2)")
            te = value
        elif name == "content-type":
            content_type = value
        elif name == "grpc-timeout":
            timeout = value
    method, path = pseudo.get(":method"), pseudo.get(":path")
    if method is None or path is None or ":scheme" not in pseudo or not path:
        raise MalformedRequest("request without :method, :scheme and a non-empty :path")
    if header_list_size(headers) > max_header_list_bytes:
        return RequestHead(path, headers, Refusal(431, h2.GRPC_RESOURCE_EXHAUSTED,
                                                  f"header list larger than {max_header_list_bytes} bytes"))
    if method != "POST":
        return RequestHead(path, headers, Refusal(405, h2.GRPC_INTERNAL, f"method {method} is not POST: gRPC only"))
    if content_type is None or not (content_type == "application/grpc"
                                    or content_type.startswith(("application/grpc+", "application/grpc;"))):
        return RequestHead(path, headers, Refusal(415, h2.GRPC_INTERNAL,
                                                  f"content-type {content_type!r} is not application/grpc"))
    if te is None:
        return RequestHead(path, headers, Refusal(400, h2.GRPC_INTERNAL, "te: trailers is required by gRPC"))
    if timeout is None:
        return RequestHead(path, headers)
    try:
        return RequestHead(path, headers, timeout=parse_grpc_timeout(timeout))
    except ValueError as exc:
        return RequestHead(path, headers, Refusal(400, h2.GRPC_INTERNAL, str(exc)))


def check_trailers(headers: Headers) -> None:
    """RFC 9113 §8.1: trailers carry no pseudo-headers."""
    for name, _ in headers:
        if name.startswith(":"):
            raise MalformedRequest(f"pseudo-header {name} in trailers")
