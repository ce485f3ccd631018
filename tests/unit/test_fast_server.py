"""The fast serving layer against a real gRPC client (grpcio) and against broken HTTP/2 input."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from authz_server.grpc_api import h2_frames as h2
from authz_server.grpc_api.fast_server import FastGrpcServer, GrpcError, Headers

ECHO = "/test.Echo/Echo"
SLOW = "/test.Echo/Slow"
FAIL = "/test.Echo/Fail"
BIG = "/test.Echo/Big"
METADATA = "/test.Echo/Metadata"


async def echo(data: bytes, headers: Headers) -> bytes:
    return data


async def slow(data: bytes, headers: Headers) -> bytes:
    """Really waits (a future resolved later), like a Check waiting for a JWKS fetch."""
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, future.set_result, b"late:")
    return await future + data


async def fail(data: bytes, headers: Headers) -> bytes:
    raise GrpcError(h2.GRPC_INVALID_ARGUMENT, "bad input: " + data.decode())


async def big(data: bytes, headers: Headers) -> bytes:
    return b"x" * 200_000  # larger than the peer's initial flow-control window


async def metadata(data: bytes, headers: Headers) -> bytes:
    """The call's custom metadata, as the handler sees it."""
    return repr([(k, v) for k, v in headers if k.startswith("x-test-")]).encode()


def run(scenario) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        server = FastGrpcServer({ECHO: echo, SLOW: slow, FAIL: fail, BIG: big, METADATA: metadata})
        port = await server.start("127.0.0.1:0")
        try:
            await scenario(port)
        finally:
            await server.stop(1.0)
    asyncio.run(main())


def call(channel: grpc.aio.Channel, method: str, payload: bytes) -> grpc.aio.UnaryUnaryCall:
    return channel.unary_unary(method)(payload, timeout=5)


def test_unary_calls_immediate_waiting_failing_and_large() -> None:
    async def scenario(port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await call(channel, ECHO, b"hi") == b"hi"
            assert await call(channel, SLOW, b"x") == b"late:x"
            assert len(await call(channel, BIG, b"")) == 200_000
            results = await asyncio.gather(*(call(channel, SLOW if i % 2 else ECHO, b"%d" % i) for i in range(200)))
            assert results == [(b"late:%d" if i % 2 else b"%d") % i for i in range(200)]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(channel, FAIL, b"nope")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == "bad input: nope"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(channel, "/test.Echo/Missing", b"")
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert await call(channel, ECHO, b"still fine") == b"still fine"
    run(scenario)



def test_handlers_receive_the_call_metadata() -> None:
    """What the caller sends as metadata (Envoy's initial_metadata) reaches the handler, per call."""
    async def scenario(port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = channel.unary_unary(METADATA)
            first = await method(b"", metadata=(("x-test-a", "1"), ("x-test-a", "2")), timeout=5)
            second = await method(b"", metadata=(("x-test-b", "3"),), timeout=5)
            assert first == repr([("x-test-a", "1"), ("x-test-a", "2")]).encode()
            assert second == repr([("x-test-b", "3")]).encode()
    run(scenario)

def raw_exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


START = h2.PREFACE + h2.settings_frame({})  # a client's connection preface


def frame_types(data: bytes) -> list[tuple[int, int]]:
    """(type, first 4 payload bytes as int) of every frame in a server's output."""
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        payload = data[9: 9 + length]
        out.append((data[3], int.from_bytes(payload[4:8], "big") if data[3] == h2.GOAWAY else 0))
        data = data[9 + length:]
    return out


@pytest.mark.parametrize(
    ("data", "goaway_code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h2.PROTOCOL_ERROR),  # not HTTP/2
        (START + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, b"\xff\xff\xff\xff"), h2.COMPRESSION_ERROR),
        (START + b"\x01\x00\x00" + bytes([h2.DATA, 0]) + b"\x00\x00\x00\x01", h2.FRAME_SIZE_ERROR),
        (START + h2.frame(h2.HEADERS, h2.END_HEADERS, 2, b""), h2.PROTOCOL_ERROR),  # even stream id
        (START + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, b""), h2.PROTOCOL_ERROR),
        (h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0, b"\x00\x04\x80\x00\x00\x00"), h2.FLOW_CONTROL_ERROR),
        (h2.PREFACE + h2.frame(h2.PING, 0, 0, b"12345678"), h2.PROTOCOL_ERROR),  # SETTINGS must come first
    ],
)
def test_protocol_errors_end_the_connection_with_goaway(data: bytes, goaway_code: int) -> None:
    async def scenario(port: int) -> None:
        reply = await asyncio.to_thread(raw_exchange, port, data)
        frames = frame_types(reply)
        assert (h2.GOAWAY, goaway_code) in frames, frames
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # the server lives on
            assert await call(channel, ECHO, b"ok") == b"ok"
    run(scenario)


def test_ping_is_answered_and_bad_grpc_framing_is_an_error_not_a_crash() -> None:
    async def scenario(port: int) -> None:
        from hpack import Encoder

        block = Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", ECHO),
                                  (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])
        data = (h2.PREFACE + h2.settings_frame({}) + h2.frame(h2.PING, 0, 0, b"12345678")
                + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, block)
                + h2.frame(h2.DATA, h2.END_STREAM, 1, b"\x01\x00\x00\x00\x01z"))  # "compressed"
        reply = await asyncio.to_thread(raw_exchange, port, data)
        assert b"12345678" in reply  # PING ACK echoes the payload
        assert b"compressed" in reply  # grpc-message of the INTERNAL error
    run(scenario)
