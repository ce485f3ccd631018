"""gRPC over HTTP/2 on both serving layers: what a request must be, and how big it may get.

The client is the ``h2`` package (an HTTP/2 implementation independent of both layers), grpcio
where a real gRPC client is the point, and raw frames for requests ``h2`` will not send.
"""

from __future__ import annotations

import socket
import struct

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loadtests import h2_attacks as a
from tests.http2.conftest import CHECK, Served

MAX_MESSAGE = 256 << 10  # the default --max-message-bytes


def h2_call(port: int, headers: list[tuple[str, str]], body: bytes) -> tuple[dict[str, str], bytes]:
    """One request with the ``h2`` package: every response header and trailer, and the body."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, headers)
    conn.send_data(stream_id, body, end_stream=True)
    answer: dict[str, str] = {}
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            for event in conn.receive_data(chunk):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answer.update(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    return answer, data
            sock.sendall(conn.data_to_send())
    return answer, data


def test_a_check_over_the_h2_package(served: Served) -> None:
    answer, body = h2_call(served.port, a.request_headers(), a.grpc_message(CHECK))
    assert answer[":status"] == "200" and answer["grpc-status"] == "0"
    assert CheckResponse.FromString(body[5:]).status.code == 0


def call(served: Served, message: bytes) -> CheckResponse:
    with grpc.insecure_channel(served.address) as channel:
        return CheckResponse.FromString(channel.unary_unary(a.CHECK_PATH)(message, timeout=10))


def test_an_undecodable_check_request_is_a_deny_not_a_grpc_error(served: Served) -> None:
    """With Envoy's failure_mode_allow an error would let the request through: it must be a deny."""
    response = call(served, b"\xff\xff\xff\xff not protobuf")
    assert response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert response.denied_response.status.code == 403


def test_a_check_request_as_large_as_envoy_sends_by_default_is_served(served: Served) -> None:
    """60 KiB of headers (Envoy's max_request_headers_kb) and a 64 KiB body in the Check."""
    request = CheckRequest.FromString(CHECK)
    http = request.attributes.request.http
    for n in range(60):
        http.headers[f"x-h{n}"] = "v" * 1000
    http.body = "b" * (64 << 10)
    assert request.ByteSize() < MAX_MESSAGE
    assert call(served, request.SerializeToString()).status.code == 0


def test_a_message_over_the_limit_is_resource_exhausted(served: Served) -> None:
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(a.CHECK_PATH)(b"\0" * (MAX_MESSAGE + 1), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert call(served, CHECK).status.code == 0


def test_an_oversized_request_is_answered_at_once_then_reset_with_no_error(fast: Served) -> None:
    """The prefix says 1 MiB: answered before the body, RST_STREAM(NO_ERROR), the rest dropped."""
    peer = a.Peer(fast.port)
    try:
        peer.send_all(a.frame(a.HEADERS, a.END_HEADERS, 1, peer.block(a.request_headers()))
                      + a.frame(a.DATA, 0, 1, struct.pack(">BI", 0, 1 << 20) + b"\0" * 16_000))
        received = peer.read_until(lambda r: 1 in r.resets)
        assert received.grpc_status(1) == "8" and received.resets[1] == a.NO_ERROR
        peer.send_all(b"".join(a.frame(a.DATA, 0, 1, b"\0" * 16_000) for _ in range(8)))  # in flight: ignored
        peer.send_all(a.frame(a.HEADERS, a.END_HEADERS, 3, peer.block(a.request_headers()))
                      + a.frame(a.DATA, a.END_STREAM, 3, a.grpc_message(CHECK)))
        received = peer.read_until(lambda r: r.grpc_status(3) is not None)
        assert received.grpc_status(3) == "0" and set(received.resets) == {1} and not received.goaway
    finally:
        peer.close()


NOT_GRPC = {
    "GET": ([("x", "")], [(":method", "GET")], "405"),
    "content-type text/plain": ([("content-type", "text/plain")], [], "415"),
    "no content-type": ([("content-type", None)], [], "415"),
    "no te: trailers": ([("te", None)], [], "400"),
    "a header list over 16 KiB": ([("x-big", "v" * 20_000)], [], "431"),
}


@pytest.mark.parametrize("case", NOT_GRPC, ids=list(NOT_GRPC))
def test_requests_that_are_not_grpc_get_an_http_answer(fast: Served, case: str) -> None:
    changes, pseudo, status = NOT_GRPC[case]
    headers = dict(a.request_headers())
    headers.update(dict(pseudo))
    for name, value in changes:
        if value is None:
            headers.pop(name)
        elif name != "x":
            headers[name] = value
    peer = a.Peer(fast.port)
    try:  # not ended: the early answer is followed by RST_STREAM(NO_ERROR)
        peer.send_all(a.header_frames(1, peer.block(headers.items())))
        received = peer.read_until(lambda r: 1 in r.resets)
    finally:
        peer.close()
    assert received.http_status(1) == status and received.grpc_status(1) is not None
    assert received.resets[1] == a.NO_ERROR


def test_an_unknown_method_is_unimplemented(served: Served) -> None:
    with grpc.insecure_channel(served.address) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/no.Such/Method")(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_reflection_streams_get_their_credit_back(served: Served) -> None:
    """A reflection call sending far more than one stream window (1.2 MB) is answered to the end."""
    requests = [reflection_pb2.ServerReflectionRequest(host="x" * 60_000, list_services="") for _ in range(20)]
    with grpc.insecure_channel(served.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    assert len(responses) == 20
    assert all(r.list_services_response.service for r in responses)
